"""Delivery against the fake R4U, over real sockets: down, slow, failing, refusing, restarting;
stop, drain, restart. Plus the fake's own strictness."""

import asyncio
import collections
import json
import logging
import re
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

from r4u_mitm import http1
from r4u_mitm.outbox import Outbox, encode, read_stats
from r4u_mitm.sender import Delivery, SetupError, parse_retry_after, rejection_reason, traces_urls
from tests.fakes.r4u import FakeR4U

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "r4u-KEY-5b9e1d7c3a0f2e4d"
BODY_MARK = "PROMPT-BODY-MARKER-8c1f"


def make(trace_id: str | None = None, **overrides) -> dict:
    now = datetime.now(UTC)
    record = {
        "started_at": (now - timedelta(seconds=1)).isoformat(),
        "completed_at": now.isoformat(),
        "status_code": 200,
        "request": f'{{"messages": [{{"role": "user", "content": "{BODY_MARK}"}}]}}',
        "request_headers": {"content-type": "application/json", "authorization": "[REDACTED]"},
        "response": f'{{"choices": [{{"message": {{"content": "{BODY_MARK} answer"}}}}]}}',
        "response_headers": {"content-type": "application/json"},
        "error": None,
        "path": None,
        "request_method": "POST",
        "request_path": "/v1/chat/completions",
        "metadata": {"trace_id": trace_id or str(uuid.uuid4()), "url": "https://api.openai.com/v1/chat/completions"},
    }
    record.update(overrides)
    return record


def maker(record: dict):
    return lambda: record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_delivery(path: Path, url: str, **options) -> Delivery:
    settings = dict(api_key=None, timeout=2.0, retry_base=0.05, retry_cap=0.4, status_interval=None)
    settings.update(options)
    return Delivery(api_url=url, outbox_path=path, **settings)


def run(coro, timeout: float = 90):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)


def once_each(fake: FakeR4U, expected: list[str]) -> None:
    counts = collections.Counter(fake.trace_ids())
    assert set(counts) == set(expected), f"missing {set(expected) - set(counts)}, extra {set(counts) - set(expected)}"
    assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n > 1}


@pytest.fixture
def fake():
    fake = FakeR4U().start()
    yield fake
    fake.stop()


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

def test_delivers_every_record_once_as_stored(fake, box):
    records = [make() for _ in range(200)]

    async def main():
        d = new_delivery(box, fake.url)
        d.start()
        for r in records:
            d.submit(maker(r))
        await until(lambda: len(fake.received) >= 200, what="200 records at R4U")
        await until(lambda: d.status()["pending"] == 0, what="an empty outbox")
        status = d.status()
        d.stop(None)
        return status

    status = run(main())
    once_each(fake, [r["metadata"]["trace_id"] for r in records])
    assert status["delivered"] == 200 and status["reachable"] is True and status["in_flight"] == 0
    assert status["retried"] == status["dead_lettered"] == status["dropped"] == status["record_errors"] == 0
    by_id = {r["metadata"]["trace_id"]: r for r in records}
    for post in fake.posts:
        assert post.path == "/v1/http-traces" and post.status == 201
        assert post.headers["content-type"] == "application/json"
        assert "x_api_key" not in post.headers  # no key, no header
        assert post.size == len(encode(by_id[post.trace_id]))  # the stored compact bytes, as is
    assert read_stats(box)["pending"] == 0


def test_r4u_down_for_the_whole_first_phase_then_started(down, box, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="r4u_mitm")
    records = [make() for _ in range(40)]
    probes = []  # the sender's probes (its only GETs) that ended
    real_get = http1.Client.get

    async def get(client, url, headers=None):
        try:
            return await real_get(client, url, headers)
        finally:
            probes.append(url)

    monkeypatch.setattr(http1.Client, "get", get)

    async def main():
        d = new_delivery(box, down.url + "/v1/")
        d.start()
        for r in records:
            d.submit(maker(r))
        await until(lambda: d.status()["pending"] == 40 and len(probes) >= 3, what="40 records held, 3 probes")
        held = d.status()
        down.start()
        await until(lambda: len(down.received) >= 40, what="40 records at R4U")
        await until(lambda: d.status()["pending"] == 0, what="an empty outbox")
        d.stop(None)
        return held

    held = run(main())
    assert held["reachable"] is False and held["delivered"] == 0 and held["last_error"]
    once_each(down, [r["metadata"]["trace_id"] for r in records])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(down.url in m and str(box) in m and "kept" in m for m in warnings), warnings
    assert sum("not answering" in m for m in warnings) == 1  # once, not per record or probe
    assert any("answers again" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


def test_503_for_the_first_posts(fake, box):
    fake.fail_next(6, 503)
    records = [make() for _ in range(30)]

    async def main():
        d = new_delivery(box, fake.url)
        d.start()
        for r in records:
            d.submit(maker(r))
        await until(lambda: len(fake.received) >= 30)
        await until(lambda: d.status()["pending"] == 0)
        status = d.status()
        d.stop(None)
        return status

    status = run(main())
    once_each(fake, [r["metadata"]["trace_id"] for r in records])
    assert [p.status for p in fake.posts].count(503) == 6
    assert status["retried"] == 6 and status["dead_lettered"] == 0
    assert status["last_error"].startswith("HTTP 503")


def test_429_with_retry_after_is_honoured(fake, box):
    fake.fail_next(1, 429, retry_after=1)
    records = [make() for _ in range(3)]

    async def main():
        d = new_delivery(box, fake.url, max_in_flight=1)
        d.start()
        for r in records:
            d.submit(maker(r))
        await until(lambda: len(fake.received) >= 3)
        d.stop(None)

    run(main())
    once_each(fake, [r["metadata"]["trace_id"] for r in records])
    statuses = [p.status for p in fake.posts]
    assert statuses[0] == 429 and statuses.count(429) == 1
    assert fake.posts[1].at - fake.posts[0].at >= 0.9  # nothing posted before Retry-After passed


def test_retry_after_forms():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("99999") == 600.0
    now = time.time()
    date = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)
    assert 28 <= parse_retry_after(date, now=now) <= 31
    assert parse_retry_after(format_datetime(datetime.fromtimestamp(now - 30, UTC), usegmt=True)) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None and parse_retry_after("nan") is None


def test_r4u_hanging_past_the_timeout_then_recovering(fake, box):
    fake.hang(2.0)
    records = [make() for _ in range(10)]

    async def main():
        d = new_delivery(box, fake.url, timeout=0.5)
        d.start()
        for r in records:
            d.submit(maker(r))
        await until(lambda: d.status()["last_error"] is not None, what="a timeout")
        error = d.status()["last_error"]
        await until(lambda: len(fake.received) >= 10, timeout=30)
        await until(lambda: d.status()["pending"] == 0)
        d.stop(None)
        return error

    error = run(main())
    assert "no answer within 0.5s" in error
    once_each(fake, [r["metadata"]["trace_id"] for r in records])


def test_r4u_slow_but_answering_loses_nothing(fake, box):
    fake.slow(0.3)
    records = [make() for _ in range(20)]

    async def main():
        d = new_delivery(box, fake.url, timeout=5)
        d.start()
        for r in records:
            d.submit(maker(r))
        await until(lambda: len(fake.received) >= 20)
        status = d.status()
        d.stop(None)
        return status

    status = run(main())
    once_each(fake, [r["metadata"]["trace_id"] for r in records])
    assert status["retried"] == 0


def test_a_poison_record_is_dead_lettered_and_the_others_delivered(fake, box, caplog):
    caplog.set_level(logging.INFO, logger="r4u_mitm")
    good = [make() for _ in range(20)]
    rejected = make()
    naive = make(started_at=datetime.now().isoformat())  # no UTC offset: the fake's strict 422
    bad_ids = {rejected["metadata"]["trace_id"], naive["metadata"]["trace_id"]}
    fake.reject(lambda r: r["metadata"]["trace_id"] == rejected["metadata"]["trace_id"])

    async def main():
        d = new_delivery(box, fake.url)
        d.start()
        for r in good[:10] + [rejected, naive] + good[10:]:
            d.submit(maker(r))
        await until(lambda: len(fake.received) >= 20)
        await until(lambda: d.status()["dead_lettered"] == 2, what="two dead letters")
        await until(lambda: d.status()["pending"] == 0)
        d.stop(None)

    run(main())
    once_each(fake, [r["metadata"]["trace_id"] for r in good])
    with Outbox(box) as outbox:
        dead = {d["trace_id"]: d for d in outbox.dead_letters()}
        assert outbox.stats()["dead_lettered"] == 2 and outbox.stats()["pending"] == 0
    assert set(dead) == bad_ids
    assert dead[rejected["metadata"]["trace_id"]]["reason"] == "HTTP 422: body: Value error, rejected by the fake"
    assert dead[naive["metadata"]["trace_id"]]["reason"].startswith("HTTP 422: body.started_at: Input should have timezone")
    for item in dead.values():
        assert item["status"] == 422 and len(item["reason"]) <= 200 and BODY_MARK not in item["reason"]
        assert BODY_MARK.encode() in item["body"]  # the record itself is kept for a look
    assert [p.status for p in fake.posts].count(422) == 2  # posted once each, never retried
    messages = caplog.text
    assert all(trace_id in messages for trace_id in bad_ids) and BODY_MARK not in messages


def test_setup_errors_keep_the_records(fake, box, caplog):
    """404 (a wrong base URL) says nothing about the record: keep it, warn once, try again."""
    caplog.set_level(logging.INFO, logger="r4u_mitm")
    records = [make() for _ in range(5)]

    async def main():
        d = new_delivery(box, fake.url + "/wrong")
        d.start()
        for r in records:
            d.submit(maker(r))
        await until(lambda: len(fake.posts) >= 10, what="posts tried again")
        status = d.status()
        d.stop(None)
        return status

    status = run(main())
    assert status["pending"] == 5 and status["dead_lettered"] == 0 and status["delivered"] == 0
    assert sum("check r4u_api_url" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.timeout(60)  # a drain that waited for R4U would take an hour
def test_stop_with_r4u_down_keeps_records_for_a_new_delivery(down, box):
    records = [make() for _ in range(25)]

    async def first_run():
        d = new_delivery(box, down.url)
        d.start()
        for r in records:
            d.submit(maker(r))
        await until(lambda: d.status()["pending"] == 25 and d.status()["reachable"] is False)
        d.stop(3600.0)  # R4U down: the drain gives up at once instead of waiting

    run(first_run())
    assert read_stats(box)["pending"] == 25
    down.start()

    async def second_run():
        d = new_delivery(box, down.url)
        d.start()
        await until(lambda: len(down.received) >= 25)
        await until(lambda: d.status()["pending"] == 0)
        d.stop(None)

    run(second_run())
    once_each(down, [r["metadata"]["trace_id"] for r in records])


def test_stop_with_drain_delivers_what_is_pending(fake, box):
    records = [make() for _ in range(300)]

    async def main():
        d = new_delivery(box, fake.url)
        d.start()
        for r in records:
            d.submit(maker(r))
        d.stop(20.0)  # sync, at once: the store thread's work, then the drain

    run(main())
    assert read_stats(box)["pending"] == 0
    once_each(fake, [r["metadata"]["trace_id"] for r in records])


def test_drain_without_a_running_sender(fake, box):
    """configure → done, no `running`: the drain still delivers (on its own loop and thread)."""
    records = [make() for _ in range(30)]
    d = new_delivery(box, fake.url)
    for r in records:
        d.submit(maker(r))
    d.stop(10.0)
    once_each(fake, [r["metadata"]["trace_id"] for r in records])
    assert read_stats(box)["pending"] == 0 and read_stats(box)["delivered"] == 30


@pytest.mark.timeout(60)  # without its deadline, the drain would wait an hour for R4U's answer
def test_stop_with_drain_returns_within_the_deadline_when_r4u_hangs(fake, box):
    fake.hang(None)
    records = [make() for _ in range(5)]

    async def main():
        d = new_delivery(box, fake.url, timeout=3600.0)
        d.start()
        for r in records:
            d.submit(maker(r))
        await until(lambda: fake.requests >= 1, what="a request held by R4U")
        d.stop(1.0)  # returns: only the drain's deadline can end the wait

    run(main())
    assert read_stats(box)["pending"] == 5
    fake.clear_faults()
    d = new_delivery(box, fake.url)
    d.stop(10.0)
    assert read_stats(box)["pending"] == 0
    assert set(fake.trace_ids()) == {r["metadata"]["trace_id"] for r in records}


def test_submit_after_stop_is_not_lost(fake, box):
    late = make()
    d = new_delivery(box, fake.url)
    d.stop(None)
    d.submit(maker(late))  # a hook firing after done
    assert read_stats(box)["pending"] == 1
    assert d.status()["pending"] == 1
    new_delivery(box, fake.url).stop(10.0)
    once_each(fake, [late["metadata"]["trace_id"]])


def test_make_record_raising_is_counted_and_the_store_thread_goes_on(fake, box, caplog):
    caplog.set_level(logging.INFO, logger="r4u_mitm")
    records = [make() for _ in range(5)]

    def broken():
        raise ZeroDivisionError(f"cannot build {BODY_MARK}"[:20])

    async def main():
        d = new_delivery(box, fake.url)
        d.start()
        d.submit(broken)
        d.submit(lambda: "not a record")
        for r in records:
            d.submit(maker(r))
        await until(lambda: len(fake.received) >= 5)
        status = d.status()
        d.stop(None)
        return status

    status = run(main())
    assert status["record_errors"] == 2
    once_each(fake, [r["metadata"]["trace_id"] for r in records])
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and "ZeroDivisionError" in errors[0].getMessage()


def test_api_key_is_sent_as_X_API_KEY_and_never_logged(down, box, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, every level
    records = [make() for _ in range(10)]
    poison = make()

    async def main():
        d = new_delivery(box, down.url, api_key=API_KEY, status_interval=0.1)
        d.start()
        for r in records[:5]:
            d.submit(maker(r))
        await until(lambda: d.status()["reachable"] is False)
        await until(lambda: "R4U=unreachable" in caplog.text, what="the periodic status line while R4U is down")
        down.fail_next(2, 500)
        down.reject(lambda r: r["metadata"]["trace_id"] == poison["metadata"]["trace_id"])
        down.start()
        for r in records[5:] + [poison]:
            d.submit(maker(r))
        await until(lambda: len(down.received) >= 10)
        await until(lambda: d.status()["dead_lettered"] == 1)
        status = d.status()
        d.stop(1.0)
        return status

    status = run(main())
    assert down.posts and all(p.headers.get("x_api_key") == API_KEY for p in down.posts)
    text = caplog.text + repr(status)
    assert API_KEY not in text and API_KEY[-8:] not in text
    assert BODY_MARK not in text


def test_flush_tries_now_instead_of_waiting_for_the_backoff(down, box, caplog):
    caplog.set_level(logging.INFO, logger="r4u_mitm")
    record = make()

    def status_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("r4u-mitm status:")]

    async def main():
        d = new_delivery(box, down.url, retry_base=3600.0, retry_cap=3600.0, status_interval=0.05)
        d.start()
        d.submit(maker(record))
        await until(lambda: d.status()["reachable"] is False)
        down.start()
        seen = len(status_lines())
        await until(lambda: len(status_lines()) >= seen + 2, what="two status lines with R4U listening")
        assert "R4U=unreachable" in status_lines()[-1] and down.requests == 0  # backing off (30 min or more)
        d.flush()
        await until(lambda: len(down.received) >= 1, what="delivery after flush")
        d.stop(None)

    run(main())
    once_each(down, [record["metadata"]["trace_id"]])


def test_a_full_outbox_drops_the_oldest_and_says_so(fake, box, caplog):
    caplog.set_level(logging.INFO, logger="r4u_mitm")
    records = [make() for _ in range(8)]
    d = new_delivery(box, fake.url, max_records=5)
    for r in records:
        d.submit(maker(r))
    d.stop(10.0)
    once_each(fake, [r["metadata"]["trace_id"] for r in records[3:]])
    assert read_stats(box)["dropped"] == 3
    said = [int(m) for m in re.findall(r"dropped the (\d+) oldest", caplog.text)]
    assert sum(said) == 3


def test_a_run_killed_with_kill_9_is_delivered_by_the_next_one(fake, box, tmp_path):
    ids_file = tmp_path / "ids"
    code = f"""
import asyncio, os, sys, time
sys.path.insert(0, {str(ROOT)!r})
from tests.test_sender import make, new_delivery
from pathlib import Path
records = [make() for _ in range(20)]
Path({str(ids_file)!r}).write_text("\\n".join(r["metadata"]["trace_id"] for r in records))
async def main():
    d = new_delivery(Path({str(box)!r}), "http://127.0.0.1:{free_port()}")
    d.start()
    for r in records:
        d.submit(lambda r=r: r)
    while d.status()["pending"] < 20:
        await asyncio.sleep(0.01)
    os.kill(os.getpid(), 9)
asyncio.run(main())
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60)
    assert proc.returncode == -9
    assert read_stats(box)["pending"] == 20

    async def main():
        d = new_delivery(box, fake.url)
        d.start()
        await until(lambda: len(fake.received) >= 20)
        d.stop(None)

    run(main())
    once_each(fake, ids_file.read_text().split())


@pytest.mark.parametrize("setting, url, ca, message", [
    ("api_url", "http://localhost:99999", None, "invalid port in 'http://localhost:99999'"),
    ("api_url", "http://u:pw-SECRET@localhost:abc/v1", None, "invalid port in 'http://localhost:abc/v1'"),
    ("api_url", "http://:8000", None, "no host in 'http://:8000'"),
    ("api_url", "localhost:8000", None, "must be an http:// or https:// URL, not 'localhost:8000'"),
    ("api_url", "http://[::1:8000", None, "invalid URL 'http://[::1:8000': Invalid IPv6 URL"),
    ("ca_file", "https://r4u.example", "not-a.pem", "{ca} is not a PEM CA bundle: "
                                                    "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found"),
    ("ca_file", "https://r4u.example", "missing.pem", "cannot read {ca}: No such file or directory"),
])
def test_settings_it_cannot_work_with_are_refused_before_anything_is_made(box, tmp_path, setting, url, ca, message):
    if ca:
        ca = tmp_path / ca
        if ca.name == "not-a.pem":
            ca.write_text("not a certificate\n")
    with pytest.raises(SetupError) as err:
        new_delivery(box, url, ca_file=ca and str(ca))
    assert err.value.setting == setting and str(err.value) == message.format(ca=ca)
    assert not box.exists()  # no outbox made for a delivery that cannot work


def test_https_is_verified_with_the_system_store_or_ca_file(box, tmp_path, caplog):
    from tests.fakes.upstream import make_cert

    caplog.set_level(logging.INFO, logger="r4u_mitm")
    cert, key = make_cert(tmp_path)
    fake = FakeR4U(tls=(cert, key)).start()
    try:
        record = make()

        async def untrusted():
            d = new_delivery(box, fake.url)  # a self-signed cert the system does not know
            d.start()
            d.submit(maker(record))
            await until(lambda: d.status()["reachable"] is False)
            status = d.status()
            d.stop(None)
            return status

        status = run(untrusted())
        assert "CERTIFICATE_VERIFY_FAILED" in status["last_error"] and not fake.posts
        assert "r4u_ca_file" in caplog.text
        assert read_stats(box)["pending"] == 1

        async def trusted():
            d = new_delivery(box, fake.url, ca_file=cert)
            d.start()
            await until(lambda: len(fake.received) >= 1)
            d.stop(None)

        run(trusted())
        once_each(fake, [record["metadata"]["trace_id"]])
    finally:
        fake.stop()


def test_status_has_everything_the_command_shows(fake, box):
    d = new_delivery(box, fake.url)
    status = d.status()
    d.stop(None)
    assert set(status) >= {"pending", "delivered", "retried", "dead_lettered", "dropped", "record_errors",
                           "in_flight", "last_error", "reachable", "oldest_pending_age_s", "outbox"}
    assert status["reachable"] is None and status["outbox"] == str(box)


@pytest.mark.parametrize("given, base", [
    ("http://localhost:8000", "http://localhost:8000"),
    ("http://localhost:8000/", "http://localhost:8000"),
    ("http://localhost:8000/v1", "http://localhost:8000"),
    ("http://localhost:8000/v1/", "http://localhost:8000"),
    ("https://r4u.example.com/api/v1", "https://r4u.example.com/api"),
    ("https://r4u.example.com/api/v1x", "https://r4u.example.com/api/v1x"),
])
def test_base_url_normalization(given, base):
    assert traces_urls(given) == (base, f"{base}/v1/http-traces", f"{base}/v1/traces?limit=1")


def test_rejection_reason_is_short_and_never_echoes_the_input():
    big = make(request="x" * 10_000)
    answer = json_response(422, {"detail": [
        {"type": "missing", "loc": ["body", "started_at"], "msg": "Field required", "input": big},
        {"type": "missing", "loc": ["body", "response"], "msg": "Field required", "input": big},
    ]})
    assert rejection_reason(answer) == "HTTP 422: body.started_at: Field required (+1 more)"
    assert rejection_reason(json_response(400, {"detail": "y" * 1000})) == ("HTTP 400: " + "y" * 1000)[:200]
    assert rejection_reason(http1.Response(413, content=b"<html>too big</html>")) == "HTTP 413: Request Entity Too Large"


def json_response(status: int, payload: object) -> http1.Response:
    return http1.Response(status, {"content-type": "application/json"}, json.dumps(payload).encode())


# The fake R4U ------------------------------------------------------------------------------------

def test_fake_accepts_valid_records_and_lists_them(fake):
    record = make(error="HTTP 503", metadata={"trace_id": "t1"}, extra_field=[1, 2])
    with httpx.Client(base_url=fake.url, trust_env=False) as client:
        answer = client.post("/v1/http-traces", json=record)
        assert answer.status_code == 201 and answer.json()["id"] == 1
        assert answer.json()["metadata"] == {"trace_id": "t1"}
        listed = client.get("/v1/traces", params={"limit": 1}).json()
        assert listed[0]["id"] == 1 and listed[0]["trace_id"] == "t1"
        assert client.get("/v1/traces/1/http-trace").json()["request"] == record["request"]
        assert client.get("/v1/nothing").status_code == 404
        assert client.get("/v1/traces", params={"limit": "x"}).status_code == 422
    assert fake.wait_for(1, timeout=1) == [record]


@pytest.mark.parametrize("change, loc, kind", [
    ({"started_at": None}, ["body", "started_at"], "datetime_type"),
    ({"started_at": "yesterday"}, ["body", "started_at"], "datetime_from_date_parsing"),
    ({"started_at": "2025-01-01T00:00:00"}, ["body", "started_at"], "timezone_aware"),
    ({"started_at": "2025-01-01T00:00:00+02:00"}, ["body", "started_at"], "value_error"),
    ({"started_at": "2025-01-01T00:00:02Z", "completed_at": "2025-01-01T00:00:01Z"}, ["body", "completed_at"],
     "value_error"),
    ({"status_code": True}, ["body", "status_code"], "int_type"),
    ({"status_code": "200"}, ["body", "status_code"], "int_type"),
    ({"request": {"a": 1}}, ["body", "request"], "string_type"),
    ({"response": None}, ["body", "response"], "string_type"),
    ({"request_headers": [["a", "b"]]}, ["body", "request_headers"], "dict_type"),
    ({"response_headers": {"x-n": 1}}, ["body", "response_headers", "x-n"], "string_type"),
    ({"error": 5}, ["body", "error"], "string_type"),
    ({"request_path": 5}, ["body", "request_path"], "string_type"),
    ({"metadata": "x"}, ["body", "metadata"], "dict_type"),
])
def test_fake_validates_strictly_and_answers_like_fastapi(fake, change, loc, kind):
    record = make(**change)
    answer = httpx.post(fake.url + "/v1/http-traces", json=record, trust_env=False)
    assert answer.status_code == 422
    (item,) = answer.json()["detail"]
    assert item["loc"] == loc and item["type"] == kind and "msg" in item and "input" in item
    assert not fake.received


def test_fake_reports_every_missing_field_and_bad_json(fake):
    with httpx.Client(base_url=fake.url, trust_env=False) as client:
        answer = client.post("/v1/http-traces", json={"metadata": {}})
        assert answer.status_code == 422
        assert {tuple(d["loc"]) for d in answer.json()["detail"]} == {
            ("body", name) for name in ("started_at", "completed_at", "status_code", "request",
                                        "request_headers", "response", "response_headers")}
        broken = client.post("/v1/http-traces", content=b"{not json", headers={"content-type": "application/json"})
        assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"
        assert client.post("/v1/http-traces", json=[1]).status_code == 422


def test_fake_faults_stop_and_restart_on_the_same_port(fake):
    with httpx.Client(base_url=fake.url, trust_env=False, timeout=5) as client:
        fake.fail_next(1, 503, retry_after=7)
        answer = client.post("/v1/http-traces", json=make())
        assert answer.status_code == 503 and answer.headers["retry-after"] == "7" and answer.json()["detail"]
        assert client.post("/v1/http-traces", json=make()).status_code == 201
        fake.hang(None)
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/http-traces", json=make(), timeout=0.3)
        deadline = time.monotonic() + 5
        while len(fake.posts) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # the fake sees the client go away
        fake.clear_faults()
        assert client.post("/v1/http-traces", json=make()).status_code == 201
    port = fake.port
    fake.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(fake.url + "/v1/traces", trust_env=False)
    fake.start()
    assert fake.port == port
    assert httpx.get(fake.url + "/v1/traces", trust_env=False).status_code == 200
    # the held request's client went away: it was dropped, not stored
    assert len(fake.received) == 2 and [p.status for p in fake.posts] == [503, 201, 0, 201]
    with pytest.raises(AssertionError, match="accepted 2 of 3 records"):
        fake.wait_for(3, timeout=0.1)


def test_fake_runs_as_a_program_and_prints_each_record():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.r4u", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert "listening" in proc.stdout.readline()
        record = make(metadata={"trace_id": "demo-1"})
        assert httpx.post(f"http://127.0.0.1:{port}/v1/http-traces", json=record, trust_env=False).status_code == 201
        assert proc.stdout.readline().split() == ["#1", "POST", "/v1/chat/completions", "200", "demo-1"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "received 1 records" in out
