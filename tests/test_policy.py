"""The delivery policy: R4U's answer → deliver, retry (when, and how long to pause) or dead-letter."""

import json
from datetime import UTC, datetime

import pytest

from r4u_mitm.delivery.policy import Decision, backoff, decide, parse_retry_after, rejection_reason
from r4u_mitm.endpoint import traces_urls

NOW = 1_700_000_000.0
HTTP_DATE_IN_30S = "Tue, 14 Nov 2023 22:13:50 GMT"  # NOW + 30 s


@pytest.mark.parametrize("status, attempts, retry_after, expected", [
    (201, 0, None, Decision("delivered")),
    (200, 5, None, Decision("delivered")),
    (204, 0, None, Decision("delivered")),
    # R4U failing or busy: retried with the backoff (draw 0: half the delay), the deliverer pauses on its backoff
    (500, 0, None, Decision("retry", 0.25, None)),
    (502, 2, None, Decision("retry", 1.0, None)),
    (503, 0, None, Decision("retry", 0.25, None)),
    (408, 0, None, Decision("retry", 0.25, None)),
    (429, 0, None, Decision("retry", 0.25, None)),
    (100, 0, None, Decision("retry", 0.25, None)),
    # Retry-After on 429/503: the record waits at least that long, and the deliverer pauses that long
    (429, 0, "3", Decision("retry", 3.0, 3.0)),
    (503, 0, HTTP_DATE_IN_30S, Decision("retry", 30.0, 30.0)),
    (503, 0, "soon", Decision("retry", 0.25, None)),
    (500, 0, "3", Decision("retry", 0.25, None)),  # ignored on other statuses
    (429, 12, "1", Decision("retry", 30.0, 1.0)),  # the backoff wins when longer (capped at 60 s)
    # answers about R4U's setup, not the record: kept, retried, said once
    (301, 0, None, Decision("retry", 0.25, None, True)),
    (401, 0, None, Decision("retry", 0.25, None, True)),
    (403, 1, None, Decision("retry", 0.5, None, True)),
    (404, 0, None, Decision("retry", 0.25, None, True)),
    (405, 0, None, Decision("retry", 0.25, None, True)),
    (407, 0, None, Decision("retry", 0.25, None, True)),
    # the record is refused: dead letter, never retried
    (400, 0, None, Decision("dead")),
    (413, 0, None, Decision("dead")),
    (422, 0, None, Decision("dead")),
    (422, 7, "5", Decision("dead")),
])
def test_decide(status, attempts, retry_after, expected):
    assert decide(status, attempts, retry_after, now=NOW, draw=0.0) == expected


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
    assert traces_urls(given) == (base, f"{base}/v1/http-traces", f"{base}/v1/traces?limit=1")


def test_rejection_reason_is_short_and_never_echoes_the_input():
    big = {"request": "x" * 10_000, "secret": "PROMPT"}
    body = json.dumps({"detail": [
        {"type": "missing", "loc": ["body", "started_at"], "msg": "Field required", "input": big},
        {"type": "missing", "loc": ["body", "response"], "msg": "Field required", "input": big},
    ]}).encode()
    assert rejection_reason(422, "Unprocessable Entity", body) == "HTTP 422: body.started_at: Field required (+1 more)"
    assert rejection_reason(400, "Bad Request", json.dumps({"detail": "y" * 1000}).encode()) == ("HTTP 400: " + "y" * 1000)[:200]
    assert rejection_reason(413, "Request Entity Too Large", b"<html>too big</html>") == "HTTP 413: Request Entity Too Large"
