"""`r4u-mitm`: mitmproxy with the r4u addon, which traces LLM API calls into R4U.

    r4u-mitm [MITMDUMP ARGS...]          mitmdump with the r4u addon (proxy on :8080)
    r4u-mitm web [MITMWEB ARGS...]       mitmweb with the r4u addon
    r4u-mitm status [--outbox FILE]      what the outbox holds, its dead letters by reason, its deliverer
    r4u-mitm deliver [--outbox FILE...]  the delivery process (the addon starts one; or run it as a service)
    r4u-mitm backfill FLOWS [...]        deliver the exchanges of a `mitmdump -w` file as traces
    r4u-mitm dead-letters list|retry|export [--reason TEXT]
                                         see the traces R4U refused, send them again, or export them

`r4u-mitm COMMAND --help` says more of a command. The addon's options are set with
`--set r4u_...=VALUE` (README, Options).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ADDON = Path(__file__).resolve().parent / "addon.py"
COMMANDS = ("web", "status", "deliver", "backfill", "dead-letters")
REASONS_SHOWN = 20
DEFAULT_OUTBOX = Path("~/.mitmproxy/r4u-outbox.sqlite")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args and args[0] in COMMANDS else None
    if command == "status":
        return status(args[1:])
    if command == "deliver":
        from r4u_mitm.delivery import deliver

        return deliver.main(args[1:])
    if command == "backfill":
        from r4u_mitm import backfill

        return backfill.main(args[1:])
    if command == "dead-letters":
        from r4u_mitm import deadletters

        return deadletters.main(args[1:])
    from mitmproxy.tools import main as tools

    run, rest = (tools.mitmweb, args[1:]) if command == "web" else (tools.mitmdump, args)
    if "-h" in rest or "--help" in rest:  # ours first, then mitmproxy's own
        print(f"{__doc__.strip()}\n\nAny other arguments go to {run.__name__}, with the addon loaded. "
              f"{run.__name__}'s own help follows.\n", flush=True)
    return run(["-s", str(ADDON), *rest]) or 0


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
    reasons = stats.pop("dead_letter_reasons")
    deliverer["running"] = deliverer_alive(deliverer)  # not if it was killed before it could say so
    stats.update({f"deliverer_{k}": v for k, v in deliverer.items() if k != "updated_at"})
    print("\n".join(f"{k:>20}: {v}" for k, v in stats.items()))
    if reasons:
        print("dead letters by reason (r4u-mitm dead-letters list|retry|export --reason TEXT):")
        for item in reasons[:REASONS_SHOWN]:
            print(f"{item['count']:>20}  {item['reason']}")
        if len(reasons) > REASONS_SHOWN:
            print(f"{'':>20}  ... {len(reasons) - REASONS_SHOWN} more reasons (--json shows them all)")
    return 0


def deliverer_alive(state: dict) -> bool:
    """Whether the deliverer a spool's state names is running (it may have been killed before it
    could say it stopped)."""
    if not state.get("running"):
        return False
    try:
        os.kill(int(state.get("pid")), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    sys.exit(main())
