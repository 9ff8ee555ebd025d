"""`r4u-mitm backfill FLOWS`: deliver the LLM exchanges of a flow file (`mitmdump -w FLOWS`) as
traces, through the same record builder and outbox as the live proxy.

A flow traced live keeps its trace id (the addon stores it in the flow's metadata), so R4U can
tell a backfilled trace from one it already has; other flows get an id derived from the flow's
own id, the same on every backfill run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
import uuid
from pathlib import Path

from mitmproxy import http, io

from r4u_mitm import hosts
from r4u_mitm.flows import freeze, pop_tags, skip_requested
from r4u_mitm.record import build_record
from r4u_mitm.sender import Delivery

DEFAULT_OUTBOX = Path("~/.mitmproxy/r4u-outbox.sqlite")
TRACE_NAMESPACE = uuid.UUID("6f1c9a52-0d7e-4d4b-9a3e-5b2f0e1c7a11")


def submit_flows(path: Path, delivery: Delivery, rules: hosts.HostRules, *, progress=None,
                 **record_options) -> tuple[int, int]:
    """Read `path` and submit a record for each matching HTTP flow: (flows read, traced).
    `record_options` go to `build_record` (max_body_bytes, redact, redact_body_keys)."""
    read = traced = 0
    with open(path, "rb") as f:
        for flow in io.FlowReader(f).stream():
            read += 1
            if isinstance(flow, http.HTTPFlow) and _submit(flow, delivery, rules, record_options):
                traced += 1
            if progress:
                progress(read, traced)
    return read, traced


def _submit(flow: http.HTTPFlow, delivery: Delivery, rules: hosts.HostRules, record_options: dict) -> bool:
    provider = rules.match(flow.request.pretty_host, flow.request.port)
    if provider is None:
        return False
    properties = {**pop_tags(flow.request.headers), **flow.metadata.get("r4u.properties", {})}
    if skip_requested(properties):
        return False
    trace_id = flow.metadata.get("r4u.trace_id") or str(uuid.uuid5(TRACE_NAMESPACE, flow.id))
    exchange = freeze(flow, trace_id=trace_id, provider=provider, properties=properties)
    delivery.submit(functools.partial(build_record, exchange, **record_options))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r4u-mitm backfill", description=__doc__.split("\n\n")[0])
    parser.add_argument("flows", type=Path, help="a flow file written by mitmdump -w")
    parser.add_argument("--r4u-url", default=os.environ.get("R4U_API_URL", "http://localhost:8000"),
                        help="R4U's base URL (default: $R4U_API_URL or %(default)s)")
    parser.add_argument("--outbox", type=Path, default=Path(os.environ.get("R4U_OUTBOX", DEFAULT_OUTBOX)),
                        help="the outbox the traces go through (default: %(default)s, the proxy's)")
    parser.add_argument("--hosts", nargs="+", default=list(hosts.DEFAULT_HOSTS),
                        help="hosts to trace, as r4u_hosts (default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024)
    parser.add_argument("--redact-headers", nargs="+", action="extend", default=[], metavar="NAME",
                        help="more header names to redact, as r4u_redact_headers")
    parser.add_argument("--redact-body-keys", nargs="+", action="extend", default=[], metavar="NAME",
                        help="more JSON member names to redact in bodies, as r4u_redact_body_keys")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds to wait for R4U to take the traces; the rest stays in the outbox")
    args = parser.parse_args(argv)
    if not args.flows.is_file():
        parser.error(f"no such flow file: {args.flows}")
    try:
        rules = hosts.parse_host_rules(args.hosts)
    except ValueError as exc:
        parser.error(f"--hosts: {exc}")
    delivery = Delivery(api_url=args.r4u_url, api_key=os.environ.get("R4U_API_KEY") or None,
                        outbox_path=args.outbox.expanduser())
    read, traced = asyncio.run(_run(args, delivery, rules))
    delivery.stop(None)
    left = delivery.status()["pending"]
    print(f"\n{read} flows read, {traced} traced; {left} trace(s) still pending in {delivery.outbox_path}",
          file=sys.stderr)
    return 0 if left == 0 else 3


async def _run(args, delivery: Delivery, rules: hosts.HostRules) -> tuple[int, int]:
    delivery.start()

    def progress(read: int, traced: int) -> None:
        print(f"\rreading {args.flows.name}: {read} flows, {traced} traced", end="", file=sys.stderr)

    settled = ("delivered", "dead_lettered", "dropped")
    before = await asyncio.to_thread(delivery.status)
    read, traced = submit_flows(args.flows, delivery, rules, progress=progress, max_body_bytes=args.max_body_bytes,
                                redact=tuple(args.redact_headers), redact_body_keys=tuple(args.redact_body_keys))
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        status = await asyncio.to_thread(delivery.status)
        done = sum(status[k] - before[k] for k in settled) + status["record_errors"]
        print(f"\rdelivering: {done} of {traced} settled, {status['pending']} pending"
              f"{', R4U not answering' if status['reachable'] is False else ''}    ", end="", file=sys.stderr)
        if done >= traced:
            break
        await asyncio.sleep(0.2)
    return read, traced


if __name__ == "__main__":
    sys.exit(main())
