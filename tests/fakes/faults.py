"""Test-only mitmproxy script: inject faults into the r4u addon of a running mitmdump, and into
the delivery process it starts.

Load it AFTER the addon (`mitmdump -s r4u_mitm/addon.py ... -s tests/fakes/faults.py`), and run
mitmdump with `DELIVERER_FAULTS_ENV` (below) in its environment so that the deliverer it starts
loads `tests/fakes/deliverer_faults/sitecustomize.py`. It is driven through the proxy itself, by
plain-HTTP requests to the made-up host `r4u-faults.test` (answered here, never sent anywhere):

    GET http://r4u-faults.test/fault/<name>   install fault <name> (removing the previous one);
                                             `none` removes it. Answers 200 "ok <name>".
    GET http://r4u-faults.test/status        the addon's `r4u.status` command output.

Faults (each raises `RuntimeError("injected fault: <name>")` where it says):
    match           hosts.HostRules.match, for provider hosts       -> addon `requestheaders` hook
    tap_init        Tap(...) as the addon builds it                 -> addon `responseheaders` hook
    tap_clock       the clock of each Tap the addon builds          -> inside the stream callable
    freeze          flows.freeze as the addon calls it              -> addon `response`/`error` hooks
    submit          supervisor.Link.append                          -> addon `response`/`error` hooks
    build_record    record.build_record                             -> the deliverer, building the record
    sse_feed        sse.SSEDecoder.feed, with the fast path off     -> the deliverer, parsing
    fast_read       fastpath.read_stream (the usual chat stream)    -> the deliverer, parsing
    stream_summary  dialects.stream_summary                         -> the deliverer, parsing
    body_summary    dialects.body_summary                           -> the deliverer, parsing

The last five happen in another process, later: while one of them is active, the traces of the
flows that start get the property `fault=<name>`, which the deliverer's patches look for (and
remove before building). mitmproxy loads the addon as a script module that is not in
sys.modules, and the addon binds `freeze` and `Tap` by name: those are patched in the addon
module's own globals, reached through the addon's class.
"""

from __future__ import annotations

from pathlib import Path

from mitmproxy import ctx, http

from r4u_mitm.proxy import supervisor
from r4u_mitm.pure import hosts

DELIVERER_FAULTS = frozenset({"build_record", "sse_feed", "fast_read", "stream_summary", "body_summary"})
DELIVERER_FAULTS_ENV = {"PYTHONPATH": str(Path(__file__).resolve().parent / "deliverer_faults"),
                        "R4U_TEST_DELIVERER_FAULTS": "1"}
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
            self._set(addon_globals, "Tap", lambda limit, budget=None: real_tap(limit, budget, clock=_boom("tap_clock")))
        elif fault == "freeze":
            self._set(addon_globals, "freeze", boom)
        elif fault == "submit":
            self._set(supervisor.Link, "append", boom)
        elif fault not in DELIVERER_FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        self.active = fault

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """After the tracer's: mark the new trace for the deliverer's patches."""
        if self.active in DELIVERER_FAULTS:
            trace = self._tracer().link.open.get(flow.id)
            if trace is not None:
                trace.properties["fault"] = self.active

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
