"""python -m infra.stack up|down|status: the embedded stack from the command line."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from infra.stack import Stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.stack")
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--external", default="", help="comma list of parts not to start: kafka,redis,inference")
    parser.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops everything")
    parser.add_argument("--no-supervise", action="store_true",
                        help="do not restart services that exit (by default a supervisor process does)")
    args = parser.parse_args(argv)
    if args.command == "down":
        stack = Stack.attach()
        names = list(stack.procs)
        stack.down()
        print(f"stopped: {', '.join(names) or 'nothing was running'}")
        return 0
    if args.command == "status":
        stack = Stack.attach()
        for name, proc in stack.procs.items():
            print(f"{name:14} pid {proc.pid:<8} {'up' if proc.alive() else 'DOWN'}  port {proc.port}  log {proc.log}")
        for name, svc in stack.supervised().items():
            up = "up" if svc.pid and svc.proc().alive() else svc.state.upper()
            last = "-" if svc.last_exit is None else str(svc.last_exit)
            print(f"{name:14} pid {svc.pid:<8} {up}  port {svc.port}  restarts {svc.restarts}  last exit {last}  "
                  f"log {svc.log}")
        return 0
    if Stack.attach().procs:
        print("a stack is already recorded in .run/stack.json; run `make down` first", file=sys.stderr)
        return 1
    stack = Stack(external=tuple(x for x in args.external.split(",") if x), supervise=not args.no_supervise)
    try:
        stack.up()
    except BaseException:
        stack.down()
        raise
    print("stack up: " + ", ".join(f"{n}(pid {p.pid})" for n, p in stack.procs.items()))
    if args.foreground:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while True:
                time.sleep(1)
        except (KeyboardInterrupt, SystemExit):
            stack.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
