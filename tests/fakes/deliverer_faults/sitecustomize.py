"""Test-only: loaded by every Python process started with this folder on PYTHONPATH. In the
delivery process (`r4u_mitm.delivery.deliver`) with R4U_TEST_DELIVERER_FAULTS=1, it patches record
building so that an exchange whose properties say `fault=<name>` fails there (see
tests/fakes/faults.py). Elsewhere it does nothing."""

import os
import sys
import threading

if os.environ.get("R4U_TEST_DELIVERER_FAULTS") == "1" and "r4u_mitm.delivery.deliver" in sys.orig_argv:
    from r4u_mitm.pure import dialects, fastpath, record, sse

    _current = threading.local()

    def _raise_if(name: str) -> None:
        if getattr(_current, "fault", None) == name:
            raise RuntimeError(f"injected fault: {name}")

    def _guarded(name: str, real):
        def patched(*args, **kwargs):
            _raise_if(name)
            return real(*args, **kwargs)

        return patched

    _real_build = record.build_record

    def build_record(ex, **options):
        _current.fault = ex.properties.pop("fault", None)
        try:
            _raise_if("build_record")
            return _real_build(ex, **options)
        finally:
            _current.fault = None

    record.build_record = build_record
    sse.SSEDecoder.feed = _guarded("sse_feed", sse.SSEDecoder.feed)
    _real_applies = fastpath.applies
    fastpath.applies = lambda *args: getattr(_current, "fault", None) != "sse_feed" and _real_applies(*args)
    fastpath.read_stream = _guarded("fast_read", fastpath.read_stream)
    dialects.stream_summary = _guarded("stream_summary", dialects.stream_summary)
    dialects.body_summary = _guarded("body_summary", dialects.body_summary)
