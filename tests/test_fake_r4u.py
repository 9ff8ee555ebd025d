"""The fake R4U's own strictness and faults: the delivery tests rely on them."""

import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.fakes.r4u import FakeR4U
from tests.harness import free_port

ROOT = Path(__file__).resolve().parents[1]


def make(trace_id: str | None = None, **overrides) -> dict:
    now = datetime.now(UTC)
    record = {
        "started_at": (now - timedelta(seconds=1)).isoformat(),
        "completed_at": now.isoformat(),
        "status_code": 200,
        "request": '{"messages": []}',
        "request_headers": {"content-type": "application/json", "authorization": "[REDACTED]"},
        "response": '{"choices": []}',
        "response_headers": {"content-type": "application/json"},
        "error": None,
        "path": None,
        "request_method": "POST",
        "request_path": "/v1/chat/completions",
        "metadata": {"trace_id": trace_id or str(uuid.uuid4()), "url": "https://api.openai.com/v1/chat/completions"},
    }
    record.update(overrides)
    return record


@pytest.fixture
def fake():
    fake = FakeR4U().start()
    yield fake
    fake.stop()


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


def test_fake_serves_health_like_r4u_and_sees_every_request(fake):
    with httpx.Client(base_url=fake.url, trust_env=False, timeout=5) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        client.post("/v1/http-traces", json=make())
        client.get("/v1/traces", params={"limit": 1})
        client.delete("/v1/nothing")
    assert fake.seen == [("GET", "/health"), ("POST", "/v1/http-traces"), ("GET", "/v1/traces?limit=1"),
                         ("DELETE", "/v1/nothing")]


def test_fake_fails_on_chosen_records_like_r4u_s_parser_and_slows_chosen_ones(fake):
    crash = "Internal error parsing HTTP trace: 'str' object has no attribute 'get'"
    fake.reject(lambda r: r["metadata"]["trace_id"] == "bad", 500, crash)
    fake.slow(0.5, lambda r: r["metadata"]["trace_id"] == "slow")
    with httpx.Client(base_url=fake.url, trust_env=False, timeout=5) as client:
        answer = client.post("/v1/http-traces", json=make("bad"))
        assert answer.status_code == 500 and answer.json() == {"detail": crash}
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/http-traces", json=make("slow"), timeout=0.1)
        assert client.post("/v1/http-traces", json=make("fine"), timeout=0.4).status_code == 201  # others at once
        assert client.get("/health", timeout=0.4).status_code == 200
        assert client.post("/v1/http-traces", json=make("slow")).status_code == 201  # answered late
    assert [_["metadata"]["trace_id"] for _ in fake.received] == ["fine", "slow"]


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
