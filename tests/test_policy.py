"""The delivery policy: R4U's answer → deliver, retry (when, and how long to pause) or dead-letter."""

import json
from datetime import UTC, datetime

import pytest

from r4u_mitm.delivery.policy import (Decision, answer_deadline, backoff, decide, parse_retry_after,
                                      rejection_reason)
from r4u_mitm.endpoint import traces_urls

NOW = 1_700_000_000.0
HTTP_DATE_IN_30S = "Tue, 14 Nov 2023 22:13:50 GMT"  # NOW + 30 s


@pytest.mark.parametrize("status, attempts, retry_after, expected", [
    (201, 0, None, Decision("delivered")),
    (200, 5, None, Decision("delivered")),
    (204, 0, None, Decision("delivered")),
    # R4U out of service or busy: retried with the backoff (draw 0: half the delay), no cap; the
    # deliverer pauses on its backoff
    (502, 2, None, Decision("retry", 1.0, None)),
    (503, 0, None, Decision("retry", 0.25, None)),
    (504, 0, None, Decision("retry", 0.25, None)),
    (503, 1000, None, Decision("retry", 30.0, None)),
    (408, 0, None, Decision("retry", 0.25, None)),
    (429, 0, None, Decision("retry", 0.25, None)),
    (408, 1000, None, Decision("retry", 30.0, None)),
    (100, 0, None, Decision("retry", 0.25, None)),
    # Retry-After on 429/503: the record waits at least that long, and the deliverer pauses that long
    (429, 0, "3", Decision("retry", 3.0, 3.0)),
    (503, 0, HTTP_DATE_IN_30S, Decision("retry", 30.0, 30.0)),
    (503, 0, "soon", Decision("retry", 0.25, None)),
    (408, 0, "3", Decision("retry", 0.25, None)),  # ignored on other statuses
    (429, 12, "1", Decision("retry", 30.0, 1.0)),  # the backoff wins when longer (capped at 60 s)
    # answers about R4U's setup, not the record: kept, retried, said once
    (301, 0, None, Decision("retry", 0.25, None, True)),
    (401, 0, None, Decision("retry", 0.25, None, True)),
    (403, 1, None, Decision("retry", 0.5, None, True)),
    (404, 0, None, Decision("retry", 0.25, None, True)),
    (405, 0, None, Decision("retry", 0.25, None, True)),
    (407, 0, None, Decision("retry", 0.25, None, True)),
    (404, 1000, None, Decision("retry", 30.0, None, True)),
    # the record is refused: dead letter, never retried
    (400, 0, None, Decision("dead")),
    (413, 0, None, Decision("dead")),
    (422, 0, None, Decision("dead")),
    (422, 7, "5", Decision("dead")),
])
def test_decide(status, attempts, retry_after, expected):
    assert decide(status, attempts, 0, retry_after, max_attempts=5, now=NOW, draw=0.0) == expected


@pytest.mark.parametrize("status, failures, max_attempts, expected", [
    # R4U answered and failed on the record: retried 15 s, 30 s, 1 min, 2 min later (draw 0: half
    # of that), without pausing the others, and dead-lettered at the max_attempts-th failure
    (500, 0, 5, Decision("retry", 7.5, 0.0, failed=True)),
    (500, 1, 5, Decision("retry", 15.0, 0.0, failed=True)),
    (500, 3, 5, Decision("retry", 60.0, 0.0, failed=True)),
    (500, 4, 5, Decision("dead")),
    (500, 9, 5, Decision("dead")),
    (500, 0, 1, Decision("dead")),  # posted once
    (500, 18, 20, Decision("retry", 300.0, 0.0, failed=True)),  # at most 10 min between two (draw 0: 5)
    (501, 0, 5, Decision("retry", 7.5, 0.0, failed=True)),
    (507, 4, 5, Decision("dead")),
    # R4U out of service: whatever the failures before, no cap
    (502, 4, 5, Decision("retry", 0.25, None)),
    (503, 9, 5, Decision("retry", 3.0, 3.0)),  # (Retry-After: 3)
    (504, 4, 1, Decision("retry", 0.25, None)),
    (429, 4, 5, Decision("retry", 3.0, 3.0)),
    (201, 4, 5, Decision("delivered")),
])
def test_r4u_failing_on_a_record_is_capped(status, failures, max_attempts, expected):
    # attempts 0: an outage's backoff is the first one, whatever the record's failures; Retry-After 3
    # (ignored on a 500)
    assert decide(status, 0, failures, "3", max_attempts=max_attempts, now=NOW, draw=0.0) == expected


def test_failure_retries_span_minutes():
    """With the default cap of 5 and the deliverer's default backoff, the posts of a record R4U
    fails on span 2 to 4 minutes whatever the draws."""
    for draw in (0.0, 0.999):
        delays = [decide(500, n, n, max_attempts=5, now=NOW, draw=draw).delay for n in range(4)]
        assert 112.5 <= sum(delays) <= 225.0
    assert decide(500, 4, 4, max_attempts=5, now=NOW, draw=0.5).action == "dead"


@pytest.mark.parametrize("size, attempts, timeout, deadline", [
    (0, 0, 10.0, 10.0),
    (1024 * 1024, 0, 10.0, 11.0),             # 1 s more per MB
    (32 * 1024 * 1024, 0, 10.0, 42.0),        # a 32 MB record
    (0, 1, 10.0, 20.0),                       # doubled on each retry
    (1024 * 1024, 2, 10.0, 44.0),
    (0, 4, 10.0, 160.0),
    (0, 50, 10.0, 160.0),                     # at most 16 times
    (0, -1, 0.5, 0.5),
])
def test_the_answer_deadline_grows_with_the_record_and_its_retries(size, attempts, timeout, deadline):
    assert answer_deadline(size, attempts, timeout) == deadline


@pytest.mark.parametrize("n, draw, delay", [
    (1, 0.0, 0.25), (1, 1.0, 0.5), (2, 0.0, 0.5), (3, 0.5, 1.5), (8, 0.0, 30.0), (9, 0.0, 30.0),
    (500, 1.0, 60.0), (0, 0.0, 0.25),
])
def test_backoff_is_exponential_capped_and_half_jitter(n, draw, delay):
    assert backoff(n, draw, base=0.5, cap=60.0) == delay


@pytest.mark.parametrize("value, seconds", [
    ("3", 3.0), (" 0 ", 0.0), ("-5", 0.0), ("99999", 600.0), ("1.5", 1.5),
    (HTTP_DATE_IN_30S, 30.0), ("Tue, 14 Nov 2023 22:12:50 GMT", 0.0),
    ("soon", None), (None, None), ("", None), ("nan", None),
])
def test_retry_after_forms(value, seconds):
    assert parse_retry_after(value, NOW) == seconds


def test_the_fixed_now_is_what_the_http_date_says():
    assert datetime.fromtimestamp(NOW + 30, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT") == HTTP_DATE_IN_30S


@pytest.mark.parametrize("given, base", [
    ("http://localhost:8000", "http://localhost:8000"),
    ("http://localhost:8000/", "http://localhost:8000"),
    ("http://localhost:8000/v1", "http://localhost:8000"),
    ("http://localhost:8000/v1/", "http://localhost:8000"),
    ("https://r4u.example.com/api/v1", "https://r4u.example.com/api"),
    ("https://r4u.example.com/api/v1x", "https://r4u.example.com/api/v1x"),
])
def test_base_url_normalization(given, base):
    assert traces_urls(given) == (base, f"{base}/v1/http-traces", f"{base}/health")


def test_rejection_reason_is_short_and_never_echoes_the_input():
    big = {"request": "x" * 10_000, "secret": "PROMPT"}
    body = json.dumps({"detail": [
        {"type": "missing", "loc": ["body", "started_at"], "msg": "Field required", "input": big},
        {"type": "missing", "loc": ["body", "response"], "msg": "Field required", "input": big},
    ]}).encode()
    assert rejection_reason(422, "Unprocessable Entity", body) == "HTTP 422: body.started_at: Field required (+1 more)"
    assert rejection_reason(400, "Bad Request", json.dumps({"detail": "y" * 1000}).encode()) == ("HTTP 400: " + "y" * 1000)[:200]
    assert rejection_reason(413, "Request Entity Too Large", b"<html>too big</html>") == "HTTP 413: Request Entity Too Large"
    # R4U's parser failing: its detail is the reason
    crashed = json.dumps({"detail": "Internal error parsing HTTP trace: 'str' object has no attribute 'get'"}).encode()
    assert rejection_reason(500, "Internal Server Error", crashed) == (
        "HTTP 500: Internal error parsing HTTP trace: 'str' object has no attribute 'get'")
