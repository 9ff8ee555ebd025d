"""The mitmproxy addon: `mitmdump -s r4u_mitm/addon.py`. Glue only.

It picks the flows to trace, tees their event streams (`tap.Tap`), freezes each finished
exchange into plain data (`record.Exchange`) and hands it to the spool writer, a queue put. The
delivery process (`r4u-mitm deliver`, started and supervised here) builds the records and posts
them: nothing in this process decodes, parses or encodes a body, or speaks to R4U. No hook
awaits anything; no hook lets an exception out to mitmproxy (a failure of the tracer must never
change what the client gets).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from mitmproxy import command, ctx, exceptions, hooks, http

from r4u_mitm.endpoint import SetupError, check_api_url, safe_url, ssl_context, traces_urls
from r4u_mitm.proxy import contentview, supervisor
from r4u_mitm.proxy.flows import PIECES_KEY, Trace, freeze, pop_tags, skip_requested
from r4u_mitm.proxy.tap import Tap
from r4u_mitm.pure import hosts
from r4u_mitm.spool import Spool, SpoolError, read_stats

log = logging.getLogger("r4u_mitm")

OUTBOX_NAME = "r4u-outbox.sqlite"
FLOWS_FOLLOWED = 10_000  # traced flows whose comment follows their delivery (most recent)
REASON_SHOWN = 120  # characters of a dead letter's reason in its flow's comment
STORE_DEADLINE = 10.0  # seconds at shutdown to store what is queued
MB = 1024 * 1024


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
        self.link: supervisor.Link | None = None  # None: not configured, or its options were refused
        self.configured = False
        self.record_options: dict = {}  # what each exchange's record is built with (see `configure`)

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
            "r4u_openai_url_alias", bool, True,
            "Send Azure OpenAI and OpenAI-compatible traces with OpenAI's URL of the same operation in "
            "metadata.url (the real one in metadata.upstream_url): R4U reads OpenAI's format only at "
            "OpenAI's URL. Off: metadata.url is the real URL, and R4U answers 400 No parser found.",
        )
        loader.add_option(
            "r4u_max_attempts", int, 5,
            "Posts of a trace R4U answers with a failure of its own (a 500: its parser crashed on it; "
            "each post adds a raw row in R4U) before the trace is dead-lettered; spread over minutes. "
            "R4U down, overloaded (502/503/504, 429, 408) or slow is waited out without a cap.",
        )
        loader.add_option(
            "r4u_drain_seconds", int, 5,
            "When the proxy stops, how long its delivery process goes on delivering pending traces; "
            "what is left stays in the outbox for the next start.",
        )
        loader.add_option(
            "r4u_memory_mb", int, 512,
            "Most megabytes of stream bodies kept by all open traces together; beyond it pieces pass "
            "through unkept and those traces say metadata.truncated. The client always gets everything.",
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
        for name in ("r4u_max_body_bytes", "r4u_outbox_max_records", "r4u_outbox_max_mb", "r4u_memory_mb"):
            if name in updated and getattr(opts, name) <= 0:
                raise exceptions.OptionsError(f"{name} must be a positive number, not {getattr(opts, name)}")
        if "r4u_drain_seconds" in updated and opts.r4u_drain_seconds < 0:
            raise exceptions.OptionsError("r4u_drain_seconds must be 0 or more")
        if "r4u_max_attempts" in updated and opts.r4u_max_attempts < 1:
            raise exceptions.OptionsError(f"r4u_max_attempts must be 1 or more, not {opts.r4u_max_attempts}")
        try:
            if "r4u_api_url" in updated:
                check_api_url(opts.r4u_api_url.strip())
            if "r4u_ca_file" in updated and opts.r4u_ca_file:
                ssl_context(opts.r4u_ca_file)
        except SetupError as exc:
            raise exceptions.OptionsError(f"r4u_{exc.setting}: {exc}") from None
        path = Path(opts.r4u_outbox or os.path.join(os.path.expanduser(opts.confdir), OUTBOX_NAME)).expanduser()
        if self.link is None or supervisor.link_key(path) != supervisor.link_key(self.link.path):
            try:  # made (or checked) here, so that a spool nobody can use refuses the option at once
                Spool(path).close()
            except SpoolError as exc:
                hint = " (set r4u_outbox or confdir to a writable place)" if isinstance(exc.__cause__, OSError) else ""
                raise exceptions.OptionsError(f"r4u_outbox: {exc}{hint}") from None
        # read here once, not per exchange (reading an option deep-copies its value); shared by the
        # exchanges stored with it, which never change it
        self.record_options = {"max_body_bytes": opts.r4u_max_body_bytes, "redact": list(opts.r4u_redact_headers),
                               "redact_body_keys": list(opts.r4u_redact_body_keys),
                               "openai_url_alias": opts.r4u_openai_url_alias}
        link = supervisor.link(path)
        if self.link is not None and link is not self.link:  # another outbox: open flows go on there
            link.open.update(self.link.open)
            self.link.open.clear()
            if self.link.running:
                self.link.stop(STORE_DEADLINE)
            supervisor.forget(self.link)
        self.link = link
        link.on_outcome = self._delivery_outcome
        link.budget.limit = opts.r4u_memory_mb * MB
        if link.running:
            self._start()

    def _start(self) -> None:
        opts = ctx.options
        args = ["--r4u-url", opts.r4u_api_url, "--drain-seconds", str(opts.r4u_drain_seconds),
                "--max-attempts", str(opts.r4u_max_attempts),
                "--max-records", str(opts.r4u_outbox_max_records), "--max-mb", str(opts.r4u_outbox_max_mb)]
        if opts.r4u_ca_file:
            args += ["--ca-file", opts.r4u_ca_file]
        if ctx.master.addons.get("view") is not None:  # mitmweb or the console: flow comments follow delivery
            args.append("--outcomes")
        self.link.start(max_records=opts.r4u_outbox_max_records, max_bytes=opts.r4u_outbox_max_mb * MB,
                        deliverer_args=args)

    def _count_error(self, where: str, flow_id: str, what: str) -> None:
        n = self.link.internal_errors = self.link.internal_errors + 1
        if n <= 10 or n % 1000 == 0:
            log.error("r4u-mitm: internal error in %s (flow %s): %s", where, flow_id, what)

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

    def running(self) -> None:
        if self.link is None:  # its options were refused: trace nothing rather than into the void
            log.error("r4u-mitm is NOT tracing: its options were refused (the error above says why)")
            return
        self._start()
        shown = safe_url(traces_urls(ctx.options.r4u_api_url)[0])
        log.info("r4u-mitm loaded: tracing %s -> %s", ", ".join(ctx.options.r4u_hosts), shown)

    def done(self) -> None:
        """At shutdown: record the flows still open, store what is queued, and let the delivery
        process drain on its own. On a script reload: nothing stops; the next instance of this
        addon takes the link (writer, deliverer, open traces) over."""
        exiting = ctx.master.should_exit.is_set() if ctx.master else True
        link = self.link
        if link is None or not exiting:
            return
        while link.open:
            _, trace = link.open.popitem()
            self._record_unfinished(trace.flow, trace)
        if link.running and not link.stop(STORE_DEADLINE):
            log.warning("r4u-mitm: traces still queued after %gs were not stored in %s", STORE_DEADLINE, link.path)
        supervisor.forget(link)
        try:
            pending = read_stats(link.path)["pending"]
        except (OSError, RuntimeError):
            return
        if pending:
            log.info("r4u-mitm: %d trace(s) pending in %s: the delivery process goes on for up to %ss, "
                     "the rest stay in the outbox for the next start", pending, link.path,
                     ctx.options.r4u_drain_seconds)

    # Hooks -------------------------------------------------------------------------------------

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        properties = pop_tags(flow.request.headers)  # the app's tags never go upstream, traced or not
        provider = self.rules.match(flow.request.pretty_host, flow.request.port)
        if provider is None or self.link is None or skip_requested(properties):
            return
        trace = Trace(flow, provider, properties)
        self.link.open[flow.id] = trace
        flow.metadata[contentview.TRACE_KEY] = trace.trace_id  # saved with the flow: backfill reuses both
        flow.metadata[contentview.PROVIDER_KEY] = provider
        if properties:
            flow.metadata["r4u.properties"] = properties
        _set_comment(flow, trace.trace_id, "open", False)  # mitmweb: ~comment <trace id prefix>

    @guarded
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        trace = self.link.open.get(flow.id)
        if trace is None:
            return
        is_event_stream = "text/event-stream" in flow.response.headers.get("content-type", "")
        if is_event_stream or flow.response.stream is True:
            flow.response.stream = True  # streamed even if the tap can't be made: never buffer an event stream
            trace.tap = Tap(self.record_options["max_body_bytes"], self.link.budget)
            flow.response.stream = trace.tap

    @guarded
    def response(self, flow: http.HTTPFlow) -> None:
        trace = self.link.open.pop(flow.id, None)
        if trace is None:
            return
        self._restore_body(flow, trace)
        self._submit(flow, trace)

    @guarded
    def error(self, flow: http.HTTPFlow) -> None:
        trace = self.link.open.pop(flow.id, None)
        if trace is None:
            return
        # the openai SDK hangs up right after [DONE], often before the HTTP terminator, so a
        # complete stream very often ends here, not in `response`
        self._restore_body(flow, trace)
        self._submit(flow, trace)

    @guarded
    def _restore_body(self, flow: http.HTTPFlow, trace: Trace) -> None:
        """Put a teed stream back into the flow when someone will look at it: mitmweb or the
        console (their `view` addon), a `save_stream_file`, or anyone once `store_streamed_bodies`
        is set; with its pieces' sizes and arrival times, from which the SSE view computes the
        time to first token (a copy of the tap's times, as a list for a saved flow: the spool
        writer empties the tap's pieces and times once they are stored). mitmdump alone drops
        flows, so there it would only cost a copy of the body on the event loop. With
        `store_streamed_bodies` mitmproxy keeps the body itself, but only of a response that
        ended well (not when the client hung up): then it is there already."""
        tap = trace.tap
        if tap is None or tap.truncated or flow.response is None:
            return
        opts = ctx.options  # (mitmproxy's test helpers have neither option)
        if not (getattr(opts, "store_streamed_bodies", False) or getattr(opts, "save_stream_file", None)
                or ctx.master.addons.get("view") is not None):
            return
        if flow.response.raw_content is None:
            flow.response.raw_content = b"".join(tap.pieces)
        flow.metadata[PIECES_KEY] = {"times": list(tap.times), "sizes": list(map(len, tap.pieces)),
                                     "clock": time.time() - time.monotonic(), "started": flow.request.timestamp_start}

    @guarded
    def _record_unfinished(self, flow: http.HTTPFlow, trace: Trace) -> None:
        self._submit(flow, trace, note="proxy stopped before the exchange finished")

    # Freezing an exchange -------------------------------------------------------------------------

    def _submit(self, flow: http.HTTPFlow, trace: Trace, note: str | None = None) -> None:
        if trace.tap is not None and trace.tap.error:
            self._count_error("the stream tap", flow.id, trace.tap.error)
        self._annotate(flow, trace)
        link = self.link
        kept = trace.tap.kept_bytes if trace.tap is not None else 0
        try:
            exchange = freeze(flow, trace_id=trace.trace_id, provider=trace.provider, properties=trace.properties,
                              tap=trace.tap, note=note)
        except Exception:
            link.budget.released += kept  # never stored: its bytes go back to the other taps' budget
            raise
        link.traced += 1
        link.append(exchange, self.record_options, kept)

    @guarded
    def _annotate(self, flow: http.HTTPFlow, trace: Trace) -> None:
        """For mitmweb: a comment that follows the trace's delivery; a mark (`~marked`) on flows
        whose trace is truncated (which the SSE view says too) or dead-lettered."""
        body = flow.response.raw_content if flow.response is not None and trace.tap is None else None
        limit = self.record_options["max_body_bytes"]
        truncated = (trace.tap is not None and trace.tap.truncated) or len(body or b"") > limit
        if truncated:
            flow.marked = ":warning:"
            flow.metadata[contentview.TRUNCATED_KEY] = True
        followed = self.link.followed
        followed[trace.trace_id] = (weakref.ref(flow), truncated)
        if len(followed) > FLOWS_FOLLOWED:
            followed.popitem(last=False)
        _set_comment(flow, trace.trace_id, "pending", truncated)

    def _delivery_outcome(self, message: dict) -> None:
        """From the delivery process, on the event loop: show what became of a flow's trace in
        mitmweb (`~comment dead-lettered`, `~comment waiting`), and why a dead letter is one."""
        trace_id, outcome = message.get("trace"), str(message.get("outcome"))
        followed = self.link.followed
        ref, truncated = followed.get(trace_id, (None, False))
        flow = ref() if ref is not None else None
        if flow is None:
            return
        if outcome in ("delivered", "dead-lettered"):
            del followed[trace_id]
        if outcome == "dead-lettered":
            flow.marked = ":warning:"
            reason = " ".join(str(message.get("reason") or "").split())  # one line, whatever was sent
            if reason:
                outcome += f": {reason if len(reason) <= REASON_SHOWN else reason[:REASON_SHOWN - 1] + '…'}"
        _set_comment(flow, trace_id, outcome, truncated)
        ctx.master.addons.trigger(hooks.UpdateHook([flow]))

    @command.command("r4u.status")
    def status(self) -> str:
        """Show r4u-mitm's delivery state: traces pending, delivered, retried, dead-lettered, dropped."""
        link = self.link
        try:
            stats = read_stats(link.path)
        except (OSError, RuntimeError):
            stats = {}
        deliverer = stats.get("deliverer") or {}
        writer = link.writer
        state = {key: stats.get(key, 0) for key in ("pending", "delivered", "retried", "dead_lettered", "dropped")}
        state.update(
            record_errors=deliverer.get("record_errors", 0), reachable=deliverer.get("reachable"),
            last_error=deliverer.get("last_error"), oldest_pending_age_s=stats.get("oldest_pending_age_s"),
            outbox=str(link.path), traced=link.traced, open=len(link.open), internal_errors=link.internal_errors,
            store_errors=writer.lost if writer is not None else 0, memory_used_mb=round(link.budget.used / MB, 1),
        )
        return ", ".join(f"{k}={v}" for k, v in state.items())

    @command.command("r4u.flush")
    def flush(self) -> None:
        """Try to deliver pending traces to R4U now."""
        if self.link:
            self.link.flush()


def _set_comment(flow: http.HTTPFlow, trace_id: str, state: str, truncated: bool) -> None:
    """`r4u <trace id prefix> · <delivery state>[ · trace truncated]`; a comment someone else
    wrote (the user in mitmweb, another addon) is left alone."""
    if flow.comment and not flow.comment.startswith("r4u "):
        return
    flow.comment = f"r4u {trace_id[:8]} · {state}" + (" · trace truncated" if truncated else "")


addons = [R4UTracer()]
