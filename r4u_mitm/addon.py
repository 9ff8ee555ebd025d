"""The mitmproxy addon: `mitmdump -s r4u_mitm/addon.py`. Glue only.

It picks the flows to trace, tees their event streams (`tap.Tap`), freezes each finished
exchange into plain data (`record.Exchange`) and hands it to the delivery, which builds the R4U
record and delivers it off the event loop. No hook awaits anything; no hook lets an exception
out to mitmproxy (a failure of the tracer must never change what the client gets).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from mitmproxy import command, ctx, exceptions, hooks, http

from r4u_mitm import contentview, hosts
from r4u_mitm.flows import freeze, pop_tags, skip_requested
from r4u_mitm.outbox import OutboxError
from r4u_mitm.record import build_record
from r4u_mitm.sender import Delivery, SetupError
from r4u_mitm.tap import Tap

log = logging.getLogger("r4u_mitm")

OUTBOX_NAME = "r4u-outbox.sqlite"
FLOWS_FOLLOWED = 10_000  # traced flows whose comment follows their delivery (most recent)
# What mitmweb's SSE view shows of a trace, copied from the record's metadata.
WIRE_FIELDS = ("provider", "ttfb_ms", "ttft_ms", "duration_ms", "events", "response_bytes", "stream_complete",
               "truncated")
SETTING_OPTIONS = {"api_url": "r4u_api_url", "ca_file": "r4u_ca_file"}  # a delivery's SetupError → the option


class _Trace:
    """What the addon keeps for a traced flow until it ends."""

    __slots__ = ("flow", "trace_id", "provider", "properties", "tap")

    def __init__(self, flow: http.HTTPFlow, provider: str, properties: dict[str, str]) -> None:
        self.flow = flow
        self.trace_id = str(uuid.uuid4())
        self.provider = provider
        self.properties = properties
        self.tap: Tap | None = None


def guarded(hook):
    """Run a hook's body so that nothing it raises reaches mitmproxy or the flow: log it once
    (with the flow id), count it, go on."""

    @functools.wraps(hook)
    def wrapper(self, *args):
        try:
            return hook(self, *args)
        except Exception as exc:  # noqa: BLE001 - the boundary between the tracer and the proxy
            self._count_error(hook.__name__, getattr(args[0], "id", "-") if args else "-", repr(exc))
        return None

    return wrapper


class R4UTracer:
    def __init__(self) -> None:
        self.rules = hosts.parse_host_rules(hosts.DEFAULT_HOSTS)
        self.delivery: Delivery | None = None
        self.delivery_settings: dict | None = None  # what self.delivery was made from
        self.configured = False
        self.open: dict[str, _Trace] = {}
        self.followed: OrderedDict[str, tuple[weakref.ref, bool]] = OrderedDict()
        self.internal_errors = 0
        self.traced = 0
        self.running_ = False

    def load(self, loader) -> None:
        contentview.register()  # mitmweb's view for event streams; once, whatever reloads the script
        self._check_loaded_soon()
        loader.add_option(
            "r4u_api_url", str, os.environ.get("R4U_API_URL", "http://localhost:8000"),
            "R4U's base URL; traces are posted to {r4u_api_url}/v1/http-traces. "
            "Default: $R4U_API_URL, else http://localhost:8000. Set R4U_API_KEY to send a key.",
        )
        loader.add_option(
            "r4u_hosts", Sequence[str], list(hosts.DEFAULT_HOSTS),
            "Hosts whose traffic is traced, as the client asked for them: 'host' or 'host=provider', "
            "wildcards ('*.openai.azure.com') and ports ('localhost:8000=openai_compatible') allowed. "
            "Providers: openai, azure_openai, anthropic, openai_compatible.",
        )
        loader.add_option(
            "r4u_outbox", Optional[str], None,
            "The SQLite file where traces wait until R4U has them. Default: r4u-outbox.sqlite in confdir.",
        )
        loader.add_option(
            "r4u_outbox_max_records", int, 100_000,
            "Most traces the outbox holds; beyond it the oldest are dropped (counted and logged).",
        )
        loader.add_option(
            "r4u_outbox_max_mb", int, 1024,
            "Most megabytes the outbox holds; beyond it the oldest traces are dropped (counted and logged).",
        )
        loader.add_option(
            "r4u_max_body_bytes", int, 32 * 1024 * 1024,
            "Most bytes of a body kept in a trace; beyond it the trace keeps the first part and says "
            "metadata.truncated. The client always gets everything.",
        )
        loader.add_option(
            "r4u_redact_headers", Sequence[str], [],
            "More header names whose values are replaced by [REDACTED] in traces "
            "(authorization, api keys, cookies and the like always are).",
        )
        loader.add_option(
            "r4u_redact_body_keys", Sequence[str], [],
            "More JSON member names whose values are replaced by \"[REDACTED]\" in request and response "
            "bodies and stream events (api_key, client_secret, password, access_token and the like always "
            "are). Matched ignoring ASCII case, with '_', '-' or nothing between words: my_token also "
            "takes myToken and MY-TOKEN.",
        )
        loader.add_option(
            "r4u_drain_seconds", int, 5,
            "On shutdown, how long to keep delivering pending traces; what is left stays in the outbox.",
        )
        loader.add_option(
            "r4u_ca_file", Optional[str], None,
            "CA bundle to verify R4U's certificate when r4u_api_url is https (default: the system's).",
        )

    def configure(self, updated: set[str]) -> None:
        self.configured = True
        opts = ctx.options
        if "r4u_hosts" in updated:
            try:
                self.rules = hosts.parse_host_rules(opts.r4u_hosts)
            except ValueError as exc:
                raise exceptions.OptionsError(f"r4u_hosts: {exc}") from None
        for name in ("r4u_max_body_bytes", "r4u_outbox_max_records", "r4u_outbox_max_mb"):
            if name in updated and getattr(opts, name) <= 0:
                raise exceptions.OptionsError(f"{name} must be a positive number, not {getattr(opts, name)}")
        if "r4u_drain_seconds" in updated and opts.r4u_drain_seconds < 0:
            raise exceptions.OptionsError("r4u_drain_seconds must be 0 or more")
        self._replace_delivery()

    def _replace_delivery(self) -> None:
        """Make the delivery the options describe when they changed, then stop the old one.
        Options it cannot work with (a malformed URL, a bad CA file, an outbox that cannot be
        written or is not one) raise OptionsError and leave the working delivery in place:
        mitmproxy refuses to start, or refuses the change and rolls the options back (which
        comes here again, with the settings in use)."""
        opts = ctx.options
        outbox = opts.r4u_outbox or os.path.join(os.path.expanduser(opts.confdir), OUTBOX_NAME)
        settings = dict(
            api_url=opts.r4u_api_url,
            api_key=os.environ.get("R4U_API_KEY") or None,
            outbox_path=Path(outbox),
            max_records=opts.r4u_outbox_max_records,
            max_bytes=opts.r4u_outbox_max_mb * 1024 * 1024,
            ca_file=opts.r4u_ca_file,
        )
        if self.delivery is not None and settings == self.delivery_settings:
            return
        try:
            delivery = Delivery(**settings, on_outcome=self._delivery_outcome)
        except SetupError as exc:
            raise exceptions.OptionsError(f"{SETTING_OPTIONS[exc.setting]}: {exc}") from None
        except OutboxError as exc:
            hint = " (set r4u_outbox or confdir to a writable place)" if isinstance(exc.__cause__, OSError) else ""
            raise exceptions.OptionsError(f"r4u_outbox: {exc}{hint}") from None
        old, self.delivery, self.delivery_settings = self.delivery, delivery, settings
        if old is not None:
            old.stop(None)
        if self.running_:
            delivery.start()

    def _check_loaded_soon(self) -> None:
        """mitmproxy drops this addon without a word when it cannot read an `--set r4u_...`
        value given at startup (a number option given something else, an option given twice),
        and runs on, tracing nothing. Once loading is over (the next turn of the event loop),
        say so loudly: mitmproxy then exits, as for any error logged during its startup."""
        try:
            asyncio.get_running_loop().call_soon(self._loaded_or_not)
        except RuntimeError:  # no event loop: mitmproxy's test helpers, not a proxy
            pass

    def _loaded_or_not(self) -> None:
        if self.configured:
            return
        probe = copy.deepcopy(ctx.options)  # mitmproxy's own parser, on a copy nobody listens to
        unread = []
        for name, value in ctx.options.deferred.items():
            if not name.startswith("r4u_"):
                continue
            try:
                probe.set(*(f"{name}={v}" for v in getattr(value, "val", [value])))
            except exceptions.OptionsError:  # (its message may hold the value: a URL with a password)
                unread.append(name)
        log.error("r4u-mitm is NOT running, nothing is traced: mitmproxy could not read --set %s (a number "
                  "option given something else, or an option given twice) and dropped the addon; fix it and "
                  "restart", " or ".join(unread) or "r4u_...")

    def _count_error(self, where: str, flow_id: str, what: str) -> None:
        self.internal_errors += 1
        if self.internal_errors <= 10 or self.internal_errors % 1000 == 0:
            log.error("r4u-mitm: internal error in %s (flow %s): %s", where, flow_id, what)

    def running(self) -> None:
        self.running_ = True
        if self.delivery is None:  # its options were refused: trace nothing rather than into the void
            log.error("r4u-mitm is NOT tracing: its options were refused (the error above says why)")
            return
        self.delivery.start()
        log.info("r4u-mitm loaded: tracing %s -> %s", ", ".join(ctx.options.r4u_hosts), self.delivery.shown_url)

    def done(self) -> None:
        """Record the flows still open, then stop delivery: at shutdown, drain within the
        deadline; on a script reload, leave the outbox to the next instance."""
        while self.open:
            _, trace = self.open.popitem()
            self._record_unfinished(trace.flow, trace)
        exiting = ctx.master.should_exit.is_set() if ctx.master else True
        if self.delivery is not None:
            self.delivery.stop(ctx.options.r4u_drain_seconds if exiting else None)
            self.delivery = None
        self.running_ = False

    # Hooks -------------------------------------------------------------------------------------

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        properties = pop_tags(flow.request.headers)  # the app's tags never go upstream, traced or not
        provider = self.rules.match(flow.request.pretty_host, flow.request.port)
        if provider is None or self.delivery is None or skip_requested(properties):
            return
        trace = _Trace(flow, provider, properties)
        self.open[flow.id] = trace
        flow.metadata["r4u.trace_id"] = trace.trace_id  # saved with the flow: backfill reuses both
        if properties:
            flow.metadata["r4u.properties"] = properties
        _set_comment(flow, trace.trace_id, "open", False)  # mitmweb: ~comment <trace id prefix>

    @guarded
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        trace = self.open.get(flow.id)
        if trace is None:
            return
        is_event_stream = "text/event-stream" in flow.response.headers.get("content-type", "")
        if is_event_stream or flow.response.stream is True:
            flow.response.stream = True  # streamed even if the tap can't be made: never buffer an event stream
            trace.tap = Tap(ctx.options.r4u_max_body_bytes)
            flow.response.stream = trace.tap

    @guarded
    def response(self, flow: http.HTTPFlow) -> None:
        trace = self.open.pop(flow.id, None)
        if trace is None:
            return
        self._restore_body(flow, trace)
        self._submit(flow, trace)

    @guarded
    def error(self, flow: http.HTTPFlow) -> None:
        trace = self.open.pop(flow.id, None)
        if trace is None:
            return
        # the openai SDK hangs up right after [DONE], often before the HTTP terminator, so a
        # complete stream very often ends here, not in `response`
        self._restore_body(flow, trace)
        self._submit(flow, trace)

    @staticmethod
    def _restore_body(flow: http.HTTPFlow, trace: _Trace) -> None:
        """Put a teed stream back into the flow when someone will look at it: mitmweb or the
        console (their `view` addon), a `save_stream_file`, or anyone once `store_streamed_bodies`
        is set. mitmdump alone drops flows, so there it would only cost a copy of the body on the
        event loop. With `store_streamed_bodies` mitmproxy keeps the body itself, but only of a
        response that ended well (not when the client hung up): then it is there already."""
        if trace.tap is None or trace.tap.truncated or flow.response is None or flow.response.raw_content is not None:
            return
        opts = ctx.options  # (mitmproxy's test helpers have neither option)
        if (getattr(opts, "store_streamed_bodies", False) or getattr(opts, "save_stream_file", None)
                or ctx.master.addons.get("view") is not None):
            flow.response.raw_content = b"".join(trace.tap.pieces)

    @guarded
    def _record_unfinished(self, flow: http.HTTPFlow, trace: _Trace) -> None:
        self._submit(flow, trace, note="proxy stopped before the exchange finished")

    # Freezing an exchange -------------------------------------------------------------------------

    def _submit(self, flow: http.HTTPFlow, trace: _Trace, note: str | None = None) -> None:
        if trace.tap is not None and trace.tap.error:
            self._count_error("the stream tap", flow.id, trace.tap.error)
        wire = self._annotate(flow, trace)
        exchange = freeze(flow, trace_id=trace.trace_id, provider=trace.provider, properties=trace.properties,
                          tap=trace.tap, note=note)
        self.traced += 1
        opts = ctx.options
        self.delivery.submit(functools.partial(
            _build_and_note, wire, exchange, max_body_bytes=opts.r4u_max_body_bytes,
            redact=tuple(opts.r4u_redact_headers), redact_body_keys=tuple(opts.r4u_redact_body_keys),
        ), trace_id=trace.trace_id)

    @guarded
    def _annotate(self, flow: http.HTTPFlow, trace: _Trace) -> dict | None:
        """For mitmweb: a place in the flow for the trace's timing, which the store thread fills
        from the record (its keys exist from here on: the dict never changes size under a
        reader); a comment that follows the trace's delivery; a mark (`~marked`) on flows whose
        trace is truncated or dead-lettered."""
        wire = dict.fromkeys(WIRE_FIELDS)
        wire["provider"] = trace.provider
        body = flow.response.raw_content if flow.response is not None and trace.tap is None else None
        truncated = (trace.tap is not None and trace.tap.truncated) or len(body or b"") > ctx.options.r4u_max_body_bytes
        if truncated:
            flow.marked = ":warning:"
        flow.metadata[contentview.WIRE_KEY] = wire
        self.followed[trace.trace_id] = (weakref.ref(flow), truncated)
        if len(self.followed) > FLOWS_FOLLOWED:
            self.followed.popitem(last=False)
        _set_comment(flow, trace.trace_id, "pending", truncated)
        return wire

    def _delivery_outcome(self, trace_id: str, outcome: str) -> None:
        """From the delivery, on the event loop: show what became of a flow's trace in mitmweb
        (`~comment dead-lettered`, `~comment waiting`)."""
        ref, truncated = self.followed.get(trace_id, (None, False))
        flow = ref() if ref is not None else None
        if flow is None:
            return
        if outcome in ("delivered", "dead-lettered"):
            del self.followed[trace_id]
        _set_comment(flow, trace_id, outcome, truncated)
        if outcome == "dead-lettered":
            flow.marked = ":warning:"
        ctx.master.addons.trigger(hooks.UpdateHook([flow]))

    @command.command("r4u.status")
    def status(self) -> str:
        """Show r4u-mitm's delivery state: traces pending, delivered, retried, dead-lettered, dropped."""
        state = dict(self.delivery.status()) if self.delivery else {}
        state.update(traced=self.traced, open=len(self.open), internal_errors=self.internal_errors)
        return ", ".join(f"{k}={v}" for k, v in state.items())

    @command.command("r4u.flush")
    def flush(self) -> None:
        """Try to deliver pending traces to R4U now."""
        if self.delivery:
            self.delivery.flush()


def _set_comment(flow: http.HTTPFlow, trace_id: str, state: str, truncated: bool) -> None:
    """`r4u <trace id prefix> · <delivery state>[ · trace truncated]`; a comment someone else
    wrote (the user in mitmweb, another addon) is left alone."""
    if flow.comment and not flow.comment.startswith("r4u "):
        return
    flow.comment = f"r4u {trace_id[:8]} · {state}" + (" · trace truncated" if truncated else "")


def _build_and_note(wire: dict | None, exchange, **options) -> dict:
    """On the store thread: build the record; copy what parsing found into the flow's wire
    timing for the SSE view (keys exist already: the dict never changes size under a reader)."""
    record = build_record(exchange, **options)
    if wire is not None:
        for key in WIRE_FIELDS:
            wire[key] = record["metadata"].get(key)
    return record


addons = [R4UTracer()]
