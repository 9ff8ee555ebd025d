"""`r4u-mitm dead-letters list|retry|export`: the traces R4U refused or failed on. The spool keeps
them raw (the most recent, up to a tenth of its bounds), with R4U's status and reason: see them,
send them again once R4U takes them (an upgrade that parses them, a fixed setup), or take them
away as the JSON records that would be posted.

    list     one line each: trace id, when it was dead-lettered, status, attempts, reason
    retry    back among the pending traces, attempts reset; the spool's deliverer is woken
    export   JSON lines of the records as they would be posted (redacted), to stdout or --output
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from r4u_mitm.cli import DEFAULT_OUTBOX, deliverer_alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r4u-mitm dead-letters", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("action", choices=("list", "retry", "export"))
    parser.add_argument("--outbox", type=Path, default=Path(os.environ.get("R4U_OUTBOX") or DEFAULT_OUTBOX),
                        help="the outbox file (default: $R4U_OUTBOX or %(default)s)")
    parser.add_argument("--reason", metavar="TEXT",
                        help="only the dead letters whose reason contains TEXT, ignoring case ('HTTP 500', "
                             "'No parser'); `r4u-mitm status` shows the reasons")
    parser.add_argument("--output", "-o", type=Path, metavar="FILE",
                        help="export: write the records to FILE (made private: mode 0600) instead of stdout")
    opts = parser.parse_args(argv)
    if opts.output is not None and opts.action != "export":
        parser.error("--output goes with export")
    path = opts.outbox.expanduser()
    if not path.is_file():
        print(f"no outbox at {path} (nothing traced yet, or another --outbox)", file=sys.stderr)
        return 1
    return {"list": _list, "retry": _retry, "export": _export}[opts.action](path, opts)


def _list(path: Path, opts: argparse.Namespace) -> int:
    from r4u_mitm.spool import read_dead_letters

    letters = read_dead_letters(path, opts.reason)
    if letters:
        print(f"{'trace id':<36}  {'dead-lettered (UTC)':<19}  status  attempts  reason")
    for item in letters:
        when = datetime.fromtimestamp(item["failed_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        status = "-" if item["status"] is None else item["status"]
        print(f"{item['trace_id']:<36}  {when}  {status:>6}  {item['attempts']:>8}  {item['reason']}")
    print(f"{len(letters)} dead letter(s){_matching(opts)} in {path}", file=sys.stderr)
    return 0


def _retry(path: Path, opts: argparse.Namespace) -> int:
    from r4u_mitm import wake
    from r4u_mitm.spool import Spool, SpoolError, read_stats

    try:
        with Spool(path) as spool:
            moved = spool.requeue_dead(opts.reason)
    except SpoolError as exc:
        print(f"r4u-mitm dead-letters: {exc}", file=sys.stderr)
        return 1
    sender = wake.Sender(path)
    sender.send()
    sender.close()
    deliverer = read_stats(path)["deliverer"]
    if deliverer_alive(deliverer):
        then = f"its deliverer (pid {deliverer['pid']}) posts them now"
    else:
        then = "no deliverer runs on it: they are posted when a proxy or `r4u-mitm deliver` does"
    print(f"{moved} dead letter(s){_matching(opts)} back among the pending traces of {path}; {then}",
          file=sys.stderr)
    return 0


def _export(path: Path, opts: argparse.Namespace) -> int:
    from r4u_mitm.delivery.deliver import build
    from r4u_mitm.delivery.policy import describe
    from r4u_mitm.spool import read_dead_letters

    letters = read_dead_letters(path, opts.reason, bodies=True)
    out = _private(opts.output) if opts.output else sys.stdout.buffer
    written = 0
    try:
        for item in letters:
            try:
                body = build(item.pop("raw"))  # as the deliverer would post it: redacted
            except Exception as exc:  # noqa: BLE001 - a record we cannot build (a bug of ours) is said, not fatal
                print(f"trace {item['trace_id']}: cannot build its record: {describe(exc)}", file=sys.stderr)
                continue
            out.write(body + b"\n")
            written += 1
        out.flush()
    finally:
        if opts.output:
            out.close()
    where = opts.output or "stdout"
    print(f"{written} record(s){_matching(opts)} exported to {where}"
          + (f"; {len(letters) - written} could not be built" if written < len(letters) else ""), file=sys.stderr)
    return 0 if written == len(letters) else 1


def _private(path: Path):
    """`path` opened for writing, readable by its owner only: the records hold prompts and answers."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return open(fd, "wb")


def _matching(opts: argparse.Namespace) -> str:
    return f" matching {opts.reason!r}" if opts.reason else ""
