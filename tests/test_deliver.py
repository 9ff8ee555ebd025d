"""The delivery process (`r4u-mitm deliver`) against the fake R4U, over real sockets and a real
spool: down, slow, failing, refusing, hanging; stdin EOF and drain; kill -9 and restart; one
deliverer per spool."""

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from r4u_mitm import wake
from r4u_mitm.delivery import policy
from r4u_mitm.delivery.deliver import STREAM_ABOVE, _answer, build, content
from r4u_mitm.pure.record import Exchange
from r4u_mitm.pure.recordjson import Streamed
from r4u_mitm.spool import Row, Spool, pack, read_stats
from tests.fakes.r4u import FakeR4U
from tests.harness import free_port

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "r4u-KEY-5b9e1d7c3a0f2e4d"
BODY_MARK = "PROMPT-BODY-MARKER-8c1f"
OPTIONS = {"max_body_bytes": 1 << 20, "redact": []}


def exchange(trace_id: str | None = None, **overrides) -> Exchange:
    now = time.time()
    ex = Exchange(
        trace_id=trace_id or str(uuid.uuid4()), provider="openai", url="https://api.openai.com/v1/chat/completions",
        method="POST", path="/v1/chat/completions",
        request_headers=[("content-type", "application/json"), ("authorization", "Bearer sk-not-for-r4u")],
        request_body=json.dumps({"messages": [{"role": "user", "content": BODY_MARK}]}).encode(),
        started_wall=now - 1, started=time.monotonic() - 1, ended=time.monotonic(), status_code=200,
        response_headers=[("content-type", "application/json")],
        pieces=[json.dumps({"model": "gpt-4o-mini", "choices": [{"message": {"content": f"{BODY_MARK} answer"}}]}).encode()],
    )
    for key, value in overrides.items():
        setattr(ex, key, value)
    return ex


def spool_in(path: Path, exchanges: list[Exchange], options: dict = OPTIONS) -> list[str]:
    with Spool(path) as spool:
        spool.append([pack(ex, options) for ex in exchanges])
    wake.Sender(path).send()
    return [ex.trace_id for ex in exchanges]


class Deliverer:
    """A real `python -m r4u_mitm.delivery.deliver --parent` process, as the addon starts it: its stdin
    is the lifeline, its stdout the messages (kept in `messages`)."""

    def __init__(self, box: Path, url: str, *args: str, env: dict | None = None) -> None:
        cmd = [sys.executable, "-m", "r4u_mitm.delivery.deliver", "--outbox", str(box), "--r4u-url", url, "--timeout", "2",
               "--retry-base", "0.05", "--retry-cap", "0.4", "--drain-seconds", "5", *args, "--parent", "--outcomes"]
        environ = {k: v for k, v in os.environ.items() if k != "R4U_API_KEY"}
        environ.update(env or {})
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=ROOT, env=environ, start_new_session=True)
        self.messages: list[dict] = []
        self.stderr = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.messages.append(json.loads(line))

    def logs(self, level: str | None = None) -> list[str]:
        return [m["msg"] for m in list(self.messages) if "log" in m and (level is None or m["log"] == level)]

    def outcomes(self) -> list[tuple[str, str]]:
        return [(m["trace"], m["outcome"]) for m in list(self.messages) if "trace" in m]

    def close_stdin(self) -> None:
        self.proc.stdin.close()

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        self.stderr = self.proc.stderr.read()
        return code

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None and not self.proc.stdin.closed:
            self.close_stdin()
        return self.wait(timeout)

    def __enter__(self) -> "Deliverer":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def until(predicate, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)
    return value


def stats(box: Path) -> dict:
    return read_stats(box)


def once_each(fake: FakeR4U, expected: list[str]) -> None:
    counts = collections.Counter(fake.trace_ids())
    assert set(counts) == set(expected), f"missing {set(expected) - set(counts)}, extra {set(counts) - set(expected)}"
    assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n > 1}


@pytest.fixture
def down():
    """A fake R4U that is not listening (yet): its port is reserved for start()."""
    fake = FakeR4U(free_port())
    yield fake
    fake.stop()


@pytest.fixture
def box(tmp_path):
    return tmp_path / "r4u" / "outbox.sqlite"


# Delivery --------------------------------------------------------------------------------------

def test_delivers_every_exchange_once_and_says_so(fake, box):
    ids = spool_in(box, [exchange() for _ in range(200)])
    with Deliverer(box, fake.url) as d:
        until(lambda: stats(box)["delivered"] == 200, what="200 delivered")
        state = stats(box)
    once_each(fake, ids)
    assert state["pending"] == 0 and state["deliverer"]["reachable"] is True
    assert state["retried"] == state["dead_lettered"] == state["dropped"] == 0
    assert state["deliverer"]["record_errors"] == 0 and state["deliverer"]["pid"] == d.proc.pid
    assert sorted(d.outcomes()) == sorted((i, "delivered") for i in ids)
    assert all(set(m) == {"trace", "outcome"} for m in d.messages if "trace" in m)  # nothing else per trace
    for post in fake.posts:
        assert post.path == "/v1/http-traces" and post.status == 201
        assert post.headers["content-type"] == "application/json"
        assert "x_api_key" not in post.headers  # no key, no header
    record = fake.received[0]
    assert record["request_headers"]["authorization"] == "[REDACTED]"  # the proxy's options applied
    assert record["metadata"]["model"] == "gpt-4o-mini" and BODY_MARK in record["request"]
    assert stats(box)["deliverer"]["running"] is False  # said on its way out


def test_big_exchanges_among_small_ones_are_each_delivered_once(fake, box):
    """Small claims and outcomes are written on the deliverer's loop, big ones (here 400 KB,
    and batches of them) in its spool thread: both ways lose and repeat nothing."""
    answer = json.dumps({"choices": [{"message": {"content": "x" * 400_000}}]}).encode()
    exchanges = [exchange(pieces=[answer]) if i % 3 == 0 else exchange() for i in range(30)]
    ids = spool_in(box, exchanges)
    with Deliverer(box, fake.url):
        until(lambda: stats(box)["delivered"] == 30, what="30 delivered")
        ids += spool_in(box, [exchange(pieces=[answer]), exchange()])  # woken, the spool's thread idle
        until(lambda: stats(box)["delivered"] == 32, what="32 delivered")
    once_each(fake, ids)
    assert sum(len(r["response"]) > 400_000 for r in fake.received) == 11


def test_a_backlog_of_big_exchanges_is_claimed_a_few_at_a_time(fake, box):
    """At most CLAIM_BYTES of exchanges are held (claimed, not yet settled): 6 MB answers two at
    a time, where the 8 posts in flight would hold 48 MB."""
    from r4u_mitm.delivery.deliver import CLAIM_BYTES

    big = json.dumps({"choices": [{"message": {"content": "x" * 6_000_000}}]}).encode()
    assert 2 * len(big) <= CLAIM_BYTES < 3 * len(big)
    ids = spool_in(box, [exchange(pieces=[big]) for _ in range(6)])
    fake.slow(0.5)
    with Deliverer(box, fake.url):
        until(lambda: stats(box)["delivered"] == 6, what="6 delivered")
    once_each(fake, ids)
    assert fake.most_in_flight <= 2


def _rss_mb(pid: int) -> float:
    return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:")) / 1024


def test_a_big_record_is_not_kept_once_posted(fake, box):
    """Nothing holds a claimed exchange after its post (the last claimed batch was kept until
    the next wake-up: a 20 MB answer stayed in memory while the deliverer idled)."""
    spool_in(box, [exchange()])
    with Deliverer(box, fake.url) as d:
        until(lambda: stats(box)["delivered"] == 1, what="the small one delivered")
        at_rest = _rss_mb(d.proc.pid)
        big = json.dumps({"choices": [{"message": {"content": "x" * 20_000_000}}]}).encode()
        spool_in(box, [exchange(pieces=[big])])
        until(lambda: stats(box)["delivered"] == 2, what="the big one delivered")
        until(lambda: _rss_mb(d.proc.pid) < at_rest + 10, timeout=5, what="its memory given back")


def test_the_deliverer_copies_the_proxys_log_into_the_spool(down, box):
    """Checkpoints cost the proxy's writer a third of storing a big stream: it leaves them to the
    deliverer (up to 64 MB of log), whose commits make them, also while R4U is down."""
    from r4u_mitm.proxy.supervisor import CHECKPOINT_PAGES

    with Deliverer(box, down.url) as d, Spool(box, checkpoint_pages=CHECKPOINT_PAGES) as writer:
        until(lambda: any("R4U" in m for m in d.logs()), what="the deliverer running")
        before = box.stat().st_size
        writer.append([pack(exchange(pieces=[b"x" * 8_000_000]), OPTIONS)])
        assert box.stat().st_size < before + 1_000_000  # in the log only: the writer copied nothing
        until(lambda: box.stat().st_size > before + 8_000_000, what="the log copied into the spool")


def test_the_options_stored_with_an_exchange_are_applied(fake, box):
    ex = exchange(request_headers=[("x-team-secret-thing", "abc"), ("content-type", "application/json")])
    spool_in(box, [ex], {"max_body_bytes": 10, "redact": ["x-team-secret-thing"]})
    with Deliverer(box, fake.url):
        (record,) = fake.wait_for(1)
    assert record["request_headers"]["x-team-secret-thing"] == "[REDACTED]"
    assert record["metadata"]["truncated"] is True and len(record["request"]) <= 10


def test_a_big_record_is_sent_as_it_is_made_with_its_content_length(fake, box):
    """A record above STREAM_ABOVE is encoded slice by slice as it is sent: R4U gets `build`'s
    bytes exactly, framed by Content-Length (the fake answers 411 to a chunked body)."""
    event = 'data: {"choices":[{"delta":{"content":"é😀 \\"北京\\" ok"}}],"model":"gpt-4o-mini"}\n\n'.encode()
    body = event * (STREAM_ABOVE // len(event) + 1000) + b"data: \xff\xfe not UTF-8\n\ndata: [DONE]\n\n"
    pieces = [body[i:i + 4096] for i in range(0, len(body), 4096)]
    ex = exchange(stream=True, response_headers=[("content-type", "text/event-stream")], pieces=pieces,
                  piece_times=[time.monotonic()] * len(pieces), wire_bytes=len(body))
    options = {"max_body_bytes": 64 << 20, "redact": []}
    packed = pack(ex, options)
    row = Row(1, ex.trace_id, 0, 0, *packed[1:])
    assert isinstance(content(row), Streamed)
    expected = build(row)
    spool_in(box, [ex], options)
    with Deliverer(box, fake.url) as d:
        (record,) = fake.wait_for(1, timeout=60)
        until(lambda: d.outcomes() == [(ex.trace_id, "delivered")], what="delivered")
    (post,) = fake.posts
    assert post.status == 201 and post.size == int(post.headers["content-length"]) == len(expected)
    assert "transfer-encoding" not in post.headers
    assert record == json.loads(expected) and "\ufffd\ufffd not UTF-8" in record["response"]


def test_an_answer_is_read_as_far_as_its_reason_needs():
    """R4U's 201 echoes the record: nothing keeps it, and a big record's is read up to
    policy.ANSWER_READ, not through (the connection is closed instead); a refusal's reason is kept."""
    made = []

    async def echo():
        for _ in range(100):  # 6.4 MB
            made.append(1)
            yield b"x" * 65536

    def r4u(request):
        if request.url.path == "/echo":
            return httpx.Response(201, content=echo())
        return httpx.Response(422, json={"detail": [{"loc": ["body", "request"], "msg": "Field required"}]})

    async def post(client, path):
        return await _answer(await client.send(client.build_request("POST", f"http://r4u{path}"), stream=True))

    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(r4u)) as client:
            return await post(client, "/echo"), await post(client, "/refused")

    echoed, refused = asyncio.run(run())
    assert echoed == b"" and policy.ANSWER_READ < len(made) * 65536 <= policy.ANSWER_READ + 65536
    assert policy.rejection_reason(422, "Unprocessable Entity", refused) == "HTTP 422: body.request: Field required"


def test_r4u_down_for_the_whole_first_phase_then_started(down, box):
    ids = spool_in(box, [exchange() for _ in range(40)])
    with Deliverer(box, down.url + "/v1/") as d:
        until(lambda: stats(box)["deliverer"].get("reachable") is False, what="R4U seen unreachable")
        until(lambda: len(d.logs("warning")) >= 1)
        held = stats(box)
        down.start()
        until(lambda: stats(box)["delivered"] == 40, what="40 delivered")
    assert held["pending"] == 40 and held["delivered"] == 0 and held["deliverer"]["last_error"]
    once_each(down, ids)
    warnings = d.logs("warning")
    assert any(down.url in m and str(box) in m and "kept" in m for m in warnings), warnings
    assert sum("not answering" in m for m in warnings) == 1  # once, not per record or probe
    assert any("answers again" in m for m in d.logs("info"))
    only_posts_and_health(down)


def test_503_for_the_first_posts(fake, box):
    fake.fail_next(6, 503)
    ids = spool_in(box, [exchange() for _ in range(30)])
    with Deliverer(box, fake.url) as d:
        until(lambda: stats(box)["delivered"] == 30)
    once_each(fake, ids)
    assert [p.status for p in fake.posts].count(503) == 6
    state = stats(box)
    assert state["retried"] == 6 and state["dead_lettered"] == 0
    assert state["deliverer"]["last_error"].startswith("HTTP 503")
    assert any(outcome.startswith("retrying (HTTP 503") for _, outcome in d.outcomes())


def test_429_with_retry_after_is_honoured(fake, box):
    fake.fail_next(1, 429, retry_after=1)
    ids = spool_in(box, [exchange() for _ in range(3)])
    with Deliverer(box, fake.url, "--in-flight", "1"):
        until(lambda: len(fake.received) >= 3)
    once_each(fake, ids)
    statuses = [p.status for p in fake.posts]
    assert statuses[0] == 429 and statuses.count(429) == 1
    assert fake.posts[1].at - fake.posts[0].at >= 0.9  # nothing posted before Retry-After passed


def test_r4u_hanging_past_the_timeout_then_recovering(fake, box):
    fake.hang(2.0)
    ids = spool_in(box, [exchange() for _ in range(10)])
    with Deliverer(box, fake.url, "--timeout", "0.5"):
        error = until(lambda: stats(box)["deliverer"].get("last_error"), what="a timeout")
        until(lambda: stats(box)["delivered"] == 10, timeout=30)
    assert "no answer within 0.5s" in error
    once_each(fake, ids)


def test_r4u_slow_but_answering_loses_nothing(fake, box):
    fake.slow(0.3)
    ids = spool_in(box, [exchange() for _ in range(20)])
    with Deliverer(box, fake.url, "--timeout", "5"):
        until(lambda: stats(box)["delivered"] == 20)
    once_each(fake, ids)
    assert stats(box)["retried"] == 0


def test_a_poison_record_is_dead_lettered_raw_and_the_others_delivered(fake, box):
    good = [exchange() for _ in range(20)]
    rejected = exchange()
    broken = exchange()  # its record cannot be built with these options: a bug of ours, kept raw
    fake.reject(lambda r: r["metadata"]["trace_id"] == rejected.trace_id)
    spool_in(box, good[:10] + [rejected] + good[10:])
    spool_in(box, [broken], {"max_body_bytes": 10, "no_such_option": True})
    with Deliverer(box, fake.url) as d:
        until(lambda: stats(box)["dead_lettered"] == 2 and stats(box)["pending"] == 0, what="two dead letters")
    once_each(fake, [ex.trace_id for ex in good])
    with Spool(box) as spool:
        dead = {item["trace_id"]: item for item in spool.dead_letters()}
    assert set(dead) == {rejected.trace_id, broken.trace_id}
    assert dead[rejected.trace_id]["reason"] == "HTTP 422: body: Value error, rejected by the fake"
    assert dead[rejected.trace_id]["status"] == 422
    assert dead[broken.trace_id]["reason"].startswith("cannot build the record: TypeError")
    for item in dead.values():
        assert len(item["reason"]) <= 200 and BODY_MARK not in item["reason"]
        assert BODY_MARK.encode() in item["raw"].request_body  # the raw exchange is kept: it can be rebuilt
    assert [p.status for p in fake.posts].count(422) == 1  # posted once, never retried
    assert stats(box)["deliverer"]["record_errors"] == 1
    text = "\n".join(d.logs())
    assert rejected.trace_id in text and broken.trace_id in text and BODY_MARK not in text
    told = {m["trace"]: m for m in d.messages if m.get("outcome") == "dead-lettered"}
    assert told[rejected.trace_id]["reason"] == "HTTP 422: body: Value error, rejected by the fake"  # for mitmweb
    assert told[broken.trace_id]["reason"].startswith("cannot build the record: TypeError")


CRASH = "Internal error parsing HTTP trace: 'str' object has no attribute 'get'"  # R4U's, measured


def only_posts_and_health(fake: FakeR4U) -> None:
    """Apart from its probe, R4U sees nothing but posts of traces (no read of what it stores)."""
    assert fake.seen and set(fake.seen) <= {("GET", "/health"), ("POST", "/v1/http-traces")}, set(fake.seen)


def test_a_record_r4u_fails_on_is_posted_max_attempts_times_then_dead_lettered(fake, box):
    """A 500 from an R4U that answers (its parser crashed on the record) is capped; an outage
    (503) is not: it is waited out, however long."""
    good = [exchange() for _ in range(10)]
    crashing = exchange()
    fake.reject(lambda r: r["metadata"]["trace_id"] == crashing.trace_id, 500, CRASH)
    fake.fail_next(8, 503)  # more 503s than max attempts: still delivered
    ids = spool_in(box, good[:5] + [crashing] + good[5:])
    with Deliverer(box, fake.url, "--max-attempts", "3", "--retry-base", "0.01") as d:
        until(lambda: stats(box)["dead_lettered"] == 1 and stats(box)["pending"] == 0, what="the dead letter")
        state = stats(box)
    once_each(fake, [i for i in ids if i != crashing.trace_id])
    assert [p.status for p in fake.posts if p.trace_id == crashing.trace_id].count(500) == 3  # no more
    assert [p.status for p in fake.posts].count(503) == 8
    with Spool(box) as spool:
        (dead,) = spool.dead_letters()
    assert dead["trace_id"] == crashing.trace_id and dead["status"] == 500 and dead["reason"] == f"HTTP 500: {CRASH}"
    assert dead["attempts"] >= 3  # its 500s, and any 503 it met
    assert state["dead_letter_reasons"] == [{"status": 500, "reason": f"HTTP 500: {CRASH}", "count": 1}]
    assert state["deliverer"]["reachable"] is True  # R4U answered all along
    assert any("failed 3 times on trace " + crashing.trace_id in m for m in d.logs("warning"))
    told = [outcome for trace, outcome in d.outcomes() if trace == crashing.trace_id]
    assert told.count(f"retrying (HTTP 500: {CRASH})") == 2 and told[-1] == "dead-lettered"
    only_posts_and_health(fake)


def test_a_record_answered_late_waits_alone_with_a_longer_deadline(fake, box):
    """R4U taking too long over one record (big, or a slow link) is not R4U down: that record is
    tried again later, with its deadline doubled each time, and the others go on."""
    late = exchange()
    others = [exchange() for _ in range(10)]
    fake.slow(1.2, only=lambda r: r["metadata"]["trace_id"] == late.trace_id)
    spool_in(box, [late] + others)
    with Deliverer(box, fake.url, "--timeout", "0.5") as d:
        until(lambda: len(fake.received) >= 10, what="the others delivered")
        until(lambda: stats(box)["delivered"] == 11, timeout=30, what="the late one delivered")
        state = stats(box)
    once_each(fake, [late.trace_id] + [ex.trace_id for ex in others])
    assert fake.received[-1]["metadata"]["trace_id"] == late.trace_id  # the others did not wait for it
    assert [p.status for p in fake.posts if p.trace_id == late.trace_id] == [0, 0, 201]  # 0.5 s, 1 s, then 2 s
    told = [outcome for trace, outcome in d.outcomes() if trace == late.trace_id]
    assert told == ["retrying (no answer within 0.5s (ReadTimeout))", "retrying (no answer within 1s (ReadTimeout))",
                    "delivered"]
    assert state["deliverer"]["reachable"] is True and state["dead_lettered"] == 0
    assert not any("not answering" in m for m in d.logs())  # R4U was never taken for down
    only_posts_and_health(fake)


def test_max_attempts_must_be_one_or_more(box, fake):
    proc = subprocess.run([sys.executable, "-m", "r4u_mitm.delivery.deliver", "--outbox", str(box), "--r4u-url",
                           fake.url, "--max-attempts", "0"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--max-attempts must be 1 or more, not 0" in proc.stderr
    assert not box.exists()


def test_setup_errors_keep_the_records(fake, box):
    """404 (a wrong base URL) says nothing about the record: keep it, warn once, try again."""
    spool_in(box, [exchange() for _ in range(5)])
    with Deliverer(box, fake.url + "/wrong") as d:
        until(lambda: len(fake.posts) >= 10, what="posts tried again")
    state = stats(box)
    assert state["pending"] == 5 and state["dead_lettered"] == 0 and state["delivered"] == 0
    assert sum("check r4u_api_url" in m for m in d.logs()) == 1


# Stopping, draining, restarting ------------------------------------------------------------------

def test_stdin_eof_with_r4u_down_exits_at_once_and_keeps_the_records(down, box):
    ids = spool_in(box, [exchange() for _ in range(25)])
    d = Deliverer(box, down.url)
    until(lambda: stats(box)["deliverer"].get("reachable") is False)
    d.close_stdin()  # the proxy is gone; R4U down: the drain gives up instead of waiting 5 s
    assert d.wait(timeout=4) == 0
    assert stats(box)["pending"] == 25
    assert any("stay in" in m for m in d.logs())
    down.start()
    with Deliverer(box, down.url):
        until(lambda: stats(box)["delivered"] == 25)
    once_each(down, ids)


def test_stdin_eof_drains_what_is_pending_then_exits(fake, box):
    ids = spool_in(box, [exchange() for _ in range(300)])
    d = Deliverer(box, fake.url, "--drain-seconds", "30")
    d.close_stdin()  # at once: everything is delivered during the drain
    assert d.wait(timeout=40) == 0
    assert stats(box)["pending"] == 0
    once_each(fake, ids)


def test_sigterm_drains_a_standalone_deliverer(fake, box):
    ids = spool_in(box, [exchange() for _ in range(5)])
    proc = subprocess.Popen([sys.executable, "-m", "r4u_mitm.delivery.deliver", "--outbox", str(box), "--r4u-url", fake.url],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        until(lambda: len(fake.received) >= 5)
        more = spool_in(box, [exchange() for _ in range(5)])  # the wake-up brings them in
        until(lambda: len(fake.received) >= 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
    once_each(fake, ids + more)
    assert stats(box)["deliverer"]["running"] is False


def test_posts_in_flight_at_stdin_eof_finish_and_are_settled(fake, box):
    spool_in(box, [])
    d = Deliverer(box, fake.url, "--drain-seconds", "10", "--timeout", "10")  # longer than the hang
    until(lambda: fake.requests >= 1, what="the start-up probe")
    fake.hang(2.0)  # the posts below are held, then answered
    ids = spool_in(box, [exchange() for _ in range(3)])
    until(lambda: fake.requests >= 2, what="a post held by R4U")
    d.close_stdin()
    assert d.wait() == 0
    assert stats(box)["pending"] == 0 and stats(box)["delivered"] == 3  # settled before it exited
    once_each(fake, ids)


def test_posts_in_flight_at_the_drain_deadline_finish_and_are_not_sent_twice(fake, box):
    fake.hang(None)
    ids = spool_in(box, [exchange() for _ in range(5)])
    d = Deliverer(box, fake.url, "--timeout", "3", "--drain-seconds", "1")
    until(lambda: fake.requests >= 1, what="a request held by R4U")
    d.close_stdin()
    assert d.wait(timeout=15) == 0  # the drain deadline, then the posts in flight time out
    assert stats(box)["pending"] == 5  # none was answered: all kept
    fake.clear_faults()
    with Deliverer(box, fake.url):
        until(lambda: stats(box)["delivered"] == 5)
    assert set(fake.trace_ids()) == set(ids)


def test_a_deliverer_killed_mid_post_loses_nothing(fake, box):
    fake.hang(None)
    ids = spool_in(box, [exchange() for _ in range(20)])
    d = Deliverer(box, fake.url)
    until(lambda: fake.requests >= 1, what="posts held by R4U")
    d.proc.kill()
    d.wait()
    assert stats(box)["pending"] == 20
    fake.clear_faults()
    with Deliverer(box, fake.url):
        until(lambda: stats(box)["delivered"] == 20)
    assert set(fake.trace_ids()) == set(ids)  # posts cut by the kill are posted again (same records)


def test_one_deliverer_per_spool_the_other_stands_by(fake, box):
    spool_in(box, [])
    first = Deliverer(box, fake.url)
    until(lambda: stats(box)["deliverer"].get("pid") == first.proc.pid, what="the first deliverer running")
    with Deliverer(box, fake.url) as second:
        ids = spool_in(box, [exchange() for _ in range(10)])
        until(lambda: stats(box)["delivered"] == 10)
        assert stats(box)["deliverer"]["pid"] == first.proc.pid  # the second one stands by
        first.proc.kill()
        first.wait()
        more = spool_in(box, [exchange() for _ in range(10)])
        until(lambda: stats(box)["delivered"] == 20, what="the second deliverer taking over")
        assert stats(box)["deliverer"]["pid"] == second.proc.pid
    once_each(fake, ids + more)


def test_api_key_is_sent_as_X_API_KEY_and_never_logged_or_stored(down, box):
    poison = exchange()
    ids = spool_in(box, [exchange() for _ in range(5)])
    with Deliverer(box, down.url, env={"R4U_API_KEY": API_KEY}) as d:
        until(lambda: stats(box)["deliverer"].get("reachable") is False)
        down.fail_next(2, 500)
        down.reject(lambda r: r["metadata"]["trace_id"] == poison.trace_id)
        down.start()
        ids += spool_in(box, [exchange() for _ in range(5)] + [poison])
        until(lambda: stats(box)["delivered"] == 10 and stats(box)["dead_lettered"] == 1)
    assert down.posts and all(p.headers.get("x_api_key") == API_KEY for p in down.posts)
    text = json.dumps(d.messages) + d.stderr.decode() + json.dumps(stats(box))
    assert API_KEY not in text and API_KEY[-8:] not in text and BODY_MARK not in text
    files = b"".join(p.read_bytes() for p in box.parent.iterdir() if p.is_file())
    assert API_KEY.encode() not in files


def test_flush_tries_now_instead_of_waiting_for_the_backoff(down, box):
    (trace_id,) = spool_in(box, [exchange()])
    with Deliverer(box, down.url, "--retry-base", "40", "--retry-cap", "60"):
        until(lambda: stats(box)["deliverer"].get("reachable") is False)
        down.start()  # the deliverer backs off 20 s or more: only the flush gets it there within 10 s
        wake.Sender(box).send(wake.FLUSH)
        until(lambda: len(down.received) >= 1, timeout=10, what="delivery after flush")
    once_each(down, [trace_id])


def test_https_is_verified_with_the_system_store_or_ca_file(box, tmp_path):
    from tests.fakes.upstream import make_cert

    cert, key = make_cert(tmp_path)
    fake = FakeR4U(tls=(cert, key)).start()
    try:
        (trace_id,) = spool_in(box, [exchange()])
        with Deliverer(box, fake.url) as d:  # a self-signed cert the system does not know
            error = until(lambda: stats(box)["deliverer"].get("last_error"))
            until(lambda: d.logs("warning"))
        assert "CERTIFICATE_VERIFY_FAILED" in error and not fake.posts
        assert any("r4u_ca_file" in m for m in d.logs("warning"))
        assert stats(box)["pending"] == 1
        with Deliverer(box, fake.url, "--ca-file", str(cert)):
            until(lambda: len(fake.received) >= 1)
        once_each(fake, [trace_id])
    finally:
        fake.stop()


def test_a_deliverer_that_cannot_open_its_spool_says_why_and_exits(tmp_path, fake):
    box = tmp_path / "outbox.sqlite"
    box.write_bytes(b"this is not a database at all" * 100)
    d = Deliverer(box, fake.url)
    assert d.wait() == 1
    (line,) = d.logs("error")
    assert "is not an r4u-mitm outbox" in line and str(box) in line


def test_status_command_shows_the_deliverer(fake, box):
    spool_in(box, [exchange() for _ in range(2)])
    with Deliverer(box, fake.url):
        until(lambda: stats(box)["delivered"] == 2)
    cli = Path(sys.executable).parent / "r4u-mitm"
    out = subprocess.run([cli, "status", "--outbox", str(box)], capture_output=True, text=True, check=True).stdout
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert {k.strip(): v for k, v in lines.items()}.items() >= {
        "pending": "0", "delivered": "2", "deliverer_running": "False", "deliverer_reachable": "True"}.items()
