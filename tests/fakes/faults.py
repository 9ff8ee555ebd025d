"""Test-only mitmproxy script: inject faults into the r4u addon of a running mitmdump.

Load it AFTER the addon (`mitmdump -s r4u_mitm/addon.py ... -s tests/fakes/faults.py`). It is
driven through the proxy itself, by plain-HTTP requests to the made-up host `r4u-faults.test`
(answered here, never sent anywhere):

    GET http://r4u-faults.test/fault/<name>   install fault <name> (removing the previous one);
                                             `none` removes it. Answers 200 "ok <name>".
    GET http://r4u-faults.test/status        the addon's `r4u.status` command output.

Faults (each raises `RuntimeError("injected fault: <name>")` where it says):
    match           hosts.HostRules.match, for provider hosts       -> addon `requestheaders` hook
    tap_init        Tap(...) as the addon builds it                 -> addon `responseheaders` hook
    tap_clock       the clock of each Tap the addon builds          -> inside the stream callable
    freeze          flows.freeze as the addon calls it              -> addon `response`/`error` hooks
    submit          sender.Delivery.submit                          -> addon `response`/`error` hooks
    build_record    record.build_record as the addon calls it       -> the delivery's store thread
    sse_feed        sse.SSEDecoder.feed, with the fast path off     -> record building (store thread)
    fast_read       fastpath.read_stream (the usual chat stream)    -> record building (store thread)
    stream_summary  dialects.stream_summary                         -> record building (store thread)
    body_summary    dialects.body_summary                           -> record building (store thread)

mitmproxy loads the addon as a script module that is not in sys.modules, and the addon binds
`build_record`, `freeze` and `Tap` by name (`from r4u_mitm.record import build_record`): those
are patched in the addon module's own globals, reached through the addon's class. The others are
looked up through their module or class at call time and are patched there.
"""

from __future__ import annotations

from mitmproxy import ctx, http

from r4u_mitm import dialects, fastpath, hosts, sender, sse

CONTROL_HOST = "r4u-faults.test"


def _boom(name: str):
    def raiser(*args, **kwargs):
        raise RuntimeError(f"injected fault: {name}")

    return raiser


class Faults:
    def __init__(self) -> None:
        self.active = "none"
        self._undo: list[tuple[object, str, object]] = []

    # -- patching ----------------------------------------------------------------------------

    def _tracer(self):
        tracer = ctx.master.addons.get("r4utracer")
        if tracer is None:
            raise RuntimeError("the r4u addon is not loaded (load faults.py after it)")
        return tracer

    def _set(self, where, name: str, value) -> None:
        if isinstance(where, dict):
            self._undo.append((where, name, where[name]))
            where[name] = value
        else:
            self._undo.append((where, name, where.__dict__[name]))  # a class: its own attribute
            setattr(where, name, value)

    def _restore(self) -> None:
        while self._undo:
            where, name, old = self._undo.pop()
            if isinstance(where, dict):
                where[name] = old
            else:
                setattr(where, name, old)
        self.active = "none"

    def install(self, fault: str) -> None:
        self._restore()
        if fault == "none":
            return
        addon_globals = type(self._tracer()).__init__.__globals__  # the addon module's namespace
        boom = _boom(fault)
        if fault == "match":
            real_match = hosts.HostRules.match

            def match(rules, host, port=None):
                if host == CONTROL_HOST:
                    return real_match(rules, host, port)
                raise RuntimeError("injected fault: match")

            self._set(hosts.HostRules, "match", match)
        elif fault == "tap_init":
            self._set(addon_globals, "Tap", boom)
        elif fault == "tap_clock":
            real_tap = addon_globals["Tap"]
            self._set(addon_globals, "Tap", lambda limit: real_tap(limit, clock=_boom("tap_clock")))
        elif fault == "freeze":
            self._set(addon_globals, "freeze", boom)
        elif fault == "submit":
            self._set(sender.Delivery, "submit", boom)
        elif fault == "build_record":
            self._set(addon_globals, "build_record", boom)
        elif fault == "sse_feed":
            self._set(fastpath.__dict__, "applies", lambda *args: False)  # the full parser reads every stream
            self._set(sse.SSEDecoder, "feed", boom)
        elif fault == "fast_read":
            self._set(fastpath.__dict__, "read_stream", boom)
        elif fault == "stream_summary":
            self._set(dialects.__dict__, "stream_summary", boom)
        elif fault == "body_summary":
            self._set(dialects.__dict__, "body_summary", boom)
        else:
            raise ValueError(f"unknown fault {fault!r}")
        self.active = fault

    # -- control requests --------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.request.pretty_host != CONTROL_HOST:
            return
        path = flow.request.path
        try:
            if path.startswith("/fault/"):
                self.install(path[len("/fault/"):])
                body = f"ok {self.active}"
            elif path == "/status":
                body = str(ctx.master.commands.call("r4u.status"))
            else:
                flow.response = http.Response.make(404, b"unknown control path")
                return
        except Exception as exc:  # noqa: BLE001 - answer the test instead of failing the flow
            flow.response = http.Response.make(500, repr(exc).encode())
            return
        flow.response = http.Response.make(200, body.encode(), {"content-type": "text/plain"})

    def done(self) -> None:
        self._restore()


addons = [Faults()]
