"""``python -m services.inference``: the inference process (see ``main``)."""

import logging
import os
import sys

from services.inference.main import main

if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Ray and Serve were shut down and their processes killed by PID in main();
    # skip interpreter teardown, where Ray's atexit hooks and leftover threads
    # could otherwise hang a process that has nothing left to do.
    os._exit(code)
