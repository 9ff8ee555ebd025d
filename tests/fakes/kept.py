"""Test-only mitmproxy script: says in the log what a flow keeps of its response body, as any
addon running after the tracer sees it (load it AFTER the addon). For each request that carries
an `x-test-id` header, when the flow ends (`response` or `error`), one line:

    kept body of <x-test-id>: <n> bytes sha256 <hex>
    kept no body of <x-test-id>
"""

from __future__ import annotations

import hashlib
import logging

log = logging.getLogger(__name__)


class KeptBody:
    def response(self, flow) -> None:
        self._report(flow)

    def error(self, flow) -> None:
        self._report(flow)

    @staticmethod
    def _report(flow) -> None:
        test_id = flow.request.headers.get("x-test-id")
        if test_id is None:
            return
        body = flow.response.raw_content if flow.response is not None else None
        if body is None:
            log.info("kept no body of %s", test_id)
        else:
            log.info("kept body of %s: %d bytes sha256 %s", test_id, len(body), hashlib.sha256(body).hexdigest())


addons = [KeptBody()]
