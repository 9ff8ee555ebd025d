"""`r4u-mitm`: the tracer in one command.

    r4u-mitm [MITMDUMP ARGS...]          mitmdump with the r4u addon (proxy on :8080)
    r4u-mitm web [MITMWEB ARGS...]       mitmweb with the r4u addon
    r4u-mitm status [--outbox FILE]      what the outbox holds and what its deliverer says
    r4u-mitm deliver [--outbox FILE...]  the delivery process (the addon starts one; or run it as a service)
    r4u-mitm backfill FLOWS [...]        deliver the exchanges of a `mitmdump -w` file as traces
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ADDON = Path(__file__).resolve().parent / "addon.py"
DEFAULT_OUTBOX = Path("~/.mitmproxy/r4u-outbox.sqlite")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args and args[0] in ("web", "status", "deliver", "backfill") else None
    if command == "status":
        return status(args[1:])
    if command == "deliver":
        from r4u_mitm.delivery import deliver

        return deliver.main(args[1:])
    if command == "backfill":
        from r4u_mitm import backfill

        return backfill.main(args[1:])
    from mitmproxy.tools import main as tools

    run = tools.mitmweb if command == "web" else tools.mitmdump
    return run(["-s", str(ADDON), *(args[1:] if command else args)]) or 0


def status(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="r4u-mitm status", description="Show what the r4u outbox holds.")
    parser.add_argument("--outbox", default=os.environ.get("R4U_OUTBOX", str(DEFAULT_OUTBOX)),
                        help="the outbox file (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    opts = parser.parse_args(argv)
    from r4u_mitm.spool import read_stats

    path = Path(opts.outbox).expanduser()
    if not path.exists():
        print(f"no outbox at {path} (nothing traced yet, or another --outbox)", file=sys.stderr)
        return 1
    stats = read_stats(path)
    if opts.json:
        print(json.dumps(stats, indent=1))
        return 0
    deliverer = stats.pop("deliverer")
    if deliverer.get("running") and not _alive(deliverer.get("pid")):
        deliverer["running"] = False  # it was killed before it could say so
    stats.update({f"deliverer_{k}": v for k, v in deliverer.items() if k != "updated_at"})
    print("\n".join(f"{k:>20}: {v}" for k, v in stats.items()))
    return 0


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    sys.exit(main())
