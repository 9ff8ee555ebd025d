"""`r4u-mitm`: the tracer in one command.

    r4u-mitm [MITMDUMP ARGS...]          mitmdump with the r4u addon (proxy on :8080)
    r4u-mitm web [MITMWEB ARGS...]       mitmweb with the r4u addon
    r4u-mitm status [--outbox FILE]      what the outbox holds, without a running proxy
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
    command = args[0] if args and args[0] in ("web", "status", "backfill") else None
    if command == "status":
        return status(args[1:])
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
    from r4u_mitm.outbox import read_stats

    path = Path(opts.outbox).expanduser()
    if not path.exists():
        print(f"no outbox at {path} (nothing traced yet, or another --outbox)", file=sys.stderr)
        return 1
    stats = read_stats(path)
    print(json.dumps(stats, indent=1) if opts.json else "\n".join(f"{k:>16}: {v}" for k, v in stats.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
