"""`r4u-mitm backfill FLOWS`: deliver the LLM exchanges of a flow file (`mitmdump -w FLOWS`) as
traces: written into the spool like the live addon's, delivered by the spool's deliverer.

A flow traced live keeps its trace id (the addon stores it in the flow's metadata), and the
spool accepts a trace id once: backfilling into a proxy's own spool never posts one of its
traces twice. Other flows get an id derived from the flow's own id, the same on every run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

from mitmproxy import http, io

from r4u_mitm.cli import DEFAULT_OUTBOX
from r4u_mitm.proxy import supervisor
from r4u_mitm.proxy.flows import freeze, pop_tags, skip_requested
from r4u_mitm.pure import hosts
from r4u_mitm.spool import Spool, pack

TRACE_NAMESPACE = uuid.UUID("6f1c9a52-0d7e-4d4b-9a3e-5b2f0e1c7a11")
BATCH = 256


def spool_flows(path: Path, spool: Spool, rules: hosts.HostRules, *, options: dict,
                progress=None) -> tuple[int, list[str], int]:
    """Read `path` and append each matching HTTP flow's exchange to `spool`:
    (flows read, trace ids added, trace ids the spool had already)."""
    read = skipped = 0
    added: list[str] = []
    batch = []

    def store() -> None:
        nonlocal skipped
        if batch:
            _, already, _ = spool.append(batch)
            skipped += already
            added.extend(item.trace_id for item in batch)
            batch.clear()

    with open(path, "rb") as f:
        for flow in io.FlowReader(f).stream():
            read += 1
            exchange = _exchange(flow, rules) if isinstance(flow, http.HTTPFlow) else None
            if exchange is not None:
                batch.append(pack(exchange, options))
                if len(batch) >= BATCH:
                    store()
            if progress:
                progress(read, len(added) + len(batch))
    store()
    return read, added, skipped


def _exchange(flow: http.HTTPFlow, rules: hosts.HostRules):
    provider = rules.match(flow.request.pretty_host, flow.request.port)
    if provider is None:
        return None
    properties = {**pop_tags(flow.request.headers), **flow.metadata.get("r4u.properties", {})}
    if skip_requested(properties):
        return None
    trace_id = flow.metadata.get("r4u.trace_id") or str(uuid.uuid5(TRACE_NAMESPACE, flow.id))
    return freeze(flow, trace_id=trace_id, provider=provider, properties=properties)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r4u-mitm backfill", description=__doc__.split("\n\n")[0])
    parser.add_argument("flows", type=Path, help="a flow file written by mitmdump -w")
    parser.add_argument("--r4u-url", default=os.environ.get("R4U_API_URL", "http://localhost:8000"),
                        help="R4U's base URL (default: $R4U_API_URL or %(default)s)")
    parser.add_argument("--outbox", type=Path, default=Path(os.environ.get("R4U_OUTBOX", DEFAULT_OUTBOX)),
                        help="the spool the traces go through (default: %(default)s, the proxy's)")
    parser.add_argument("--hosts", nargs="+", default=list(hosts.DEFAULT_HOSTS),
                        help="hosts to trace, as r4u_hosts (default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024)
    parser.add_argument("--redact-headers", nargs="+", action="extend", default=[], metavar="NAME",
                        help="more header names to redact, as r4u_redact_headers")
    parser.add_argument("--redact-body-keys", nargs="+", action="extend", default=[], metavar="NAME",
                        help="more JSON member names to redact in bodies, as r4u_redact_body_keys")
    parser.add_argument("--no-openai-url-alias", dest="openai_url_alias", action="store_false",
                        help="Azure and compatible hosts keep their real URL in metadata.url, as "
                             "r4u_openai_url_alias=false")
    parser.add_argument("--max-attempts", type=int, default=5,
                        help="posts of a trace R4U fails on before it is dead-lettered, as r4u_max_attempts "
                             "(default: %(default)s)")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds to wait for R4U to take the traces; the rest stays in the outbox")
    args = parser.parse_args(argv)
    if not args.flows.is_file():
        parser.error(f"no such flow file: {args.flows}")
    if args.max_attempts < 1:
        parser.error(f"--max-attempts must be 1 or more, not {args.max_attempts}")
    try:
        rules = hosts.parse_host_rules(args.hosts)
    except ValueError as exc:
        parser.error(f"--hosts: {exc}")
    path = args.outbox.expanduser()

    def progress(read: int, traced: int) -> None:
        print(f"\rreading {args.flows.name}: {read} flows, {traced} traced", end="", file=sys.stderr)

    with Spool(path) as spool:
        read, added, skipped = spool_flows(args.flows, spool, rules, progress=progress,
                                           options={"max_body_bytes": args.max_body_bytes,
                                                    "redact": args.redact_headers,
                                                    "redact_body_keys": args.redact_body_keys,
                                                    "openai_url_alias": args.openai_url_alias})
        print(f"\r{read} flows read, {len(added)} traced ({skipped} already in {path})", file=sys.stderr)
        # a deliverer for the spool: this one, or (standing by) the one a proxy runs already
        deliverer = supervisor.Deliverer(path, ["--r4u-url", args.r4u_url, "--drain-seconds", "0",
                                                "--max-attempts", str(args.max_attempts)],
                                         lambda message: _show(message))
        deadline = time.monotonic() + args.wait
        try:
            while (left := spool.pending_of(added)) and time.monotonic() < deadline:
                print(f"\rdelivering: {len(added) - left} of {len(added)} settled    ", end="", file=sys.stderr)
                time.sleep(0.1)
        finally:
            deliverer.stop()
    print(f"\n{left} trace(s) still pending in {path}", file=sys.stderr)
    return 0 if left == 0 else 3


def _show(message: dict) -> None:
    if message.get("log") in ("warning", "error"):
        print(f"\n{message.get('msg')}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
