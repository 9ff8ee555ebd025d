"""The quickest way to see r4u-mitm work: fake OpenAI + fake R4U + the proxy + the openai SDK."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openai  # noqa: E402

from tests.fakes.r4u import FakeR4U  # noqa: E402
from tests.fakes.upstream import FakeUpstream  # noqa: E402
from tests.harness import Mitmdump  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]


def main() -> int:
    upstream, r4u = FakeUpstream(tls=True).start(), FakeR4U()
    r4u.start()
    work = Path(tempfile.mkdtemp(prefix="r4u-demo-"))
    try:
        with Mitmdump(work, r4u_url=r4u.url, upstream_port=upstream.port) as proxy:
            print(f"proxy on {proxy.url}, fake OpenAI on :{upstream.port}, fake R4U at {r4u.url}\n")
            os.environ.update(proxy.client_env())
            client = openai.OpenAI(api_key="sk-demo-not-a-real-key", max_retries=0)
            messages = [{"role": "user", "content": "Say hello in French"}]
            plain = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
            print("app, plain:    ", plain.choices[0].message.content)
            stream = client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True,
                                                    extra_headers={"X-R4U-Session": "demo"})
            print("app, streamed: ", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
            tools = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=TOOLS)
            print("app, tool call:", [c.function.name for c in tools.choices[0].message.tool_calls])
            received = r4u.wait_for(3, timeout=20)
        print("\nR4U received:")
        for trace in received:
            meta = trace["metadata"]
            print(f"  {trace['request_method']} {meta['url']} -> {trace['status_code']}  "
                  f"stream={meta['stream']} complete={meta['stream_complete']} events={meta['events']} "
                  f"ttft_ms={meta['ttft_ms']} duration_ms={meta['duration_ms']} model={meta['model']} "
                  f"finish={meta['finish_reason']} error={trace['error']} "
                  f"authorization={trace['request_headers'].get('authorization')} "
                  f"properties={meta.get('properties', {})}")
        return 0
    finally:
        r4u.stop()
        upstream.stop()


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"\ndone in {time.monotonic() - started:.1f}s")
    sys.exit(code)
