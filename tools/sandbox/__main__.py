"""``python -m tools.sandbox --host 127.0.0.1 --port N [--latency-ms MS]``: one uvicorn process.

uvicorn already turns SIGTERM/SIGINT into a graceful shutdown (stop accepting, finish in-flight requests,
exit 0), which is what the stack's stop-by-PID expects; we only add the "ready" line once the socket is
bound, so logs say exactly when the port can be used (port 0 logs the port actually chosen)."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys

import uvicorn

from tools.sandbox.api import create_app

log = logging.getLogger("tools.sandbox")


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    log.info("sandbox ready on http://%s:%s", host, port)

    def handle_exit(self, sig: int, frame: object) -> None:
        # uvicorn's own handler re-raises the signal after its graceful shutdown, so the process would die
        # with status 143; a completed graceful stop is a success, so just ask the loop to stop and exit 0.
        # A second SIGINT still forces an immediate stop, as in uvicorn.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.sandbox", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18100)
    ap.add_argument("--latency-ms", type=int, default=0, help="baseline latency added to every /v1 request")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    if args.latency_ms < 0:
        ap.error("--latency-ms must be >= 0")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s sandbox %(message)s")
    config = uvicorn.Config(create_app(latency_ms=args.latency_ms), host=args.host, port=args.port,
                            log_level=args.log_level, access_log=False, lifespan="off", workers=1)
    _Server(config).run()
    log.info("sandbox stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
