"""The `r4u-mitm` command line in subprocesses, against real spools: its help, `status` with the
dead letters by reason, `dead-letters list|retry|export`."""

from __future__ import annotations

import gzip
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from r4u_mitm.delivery.deliver import build
from r4u_mitm.spool import Spool, read_dead_letters, read_stats
from tests.test_deliver import BODY_MARK, OPTIONS, Deliverer, exchange, once_each, spool_in, until

CLI = Path(sys.executable).parent / "r4u-mitm"
CRASH = "Internal error parsing HTTP trace: 'str' object has no attribute 'get'"
KEY = "sk-gzipped-SECRET-77aa1e"


def r4u_mitm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "R4U_OUTBOX"}
    run = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60, env=env)
    if check:
        assert run.returncode == 0, run.stderr
    return run


@pytest.mark.parametrize("args, program", [(["--help"], "mitmdump"), (["-p", "9999", "-h"], "mitmdump"),
                                           (["web", "--help"], "mitmweb")])
def test_help_names_our_commands_first_then_mitmproxy_s_options(args, program):
    out = r4u_mitm(*args, check=False).stdout
    ours, _, theirs = out.partition(f"Any other arguments go to {program}, with the addon loaded.")
    for command in ("r4u-mitm web", "r4u-mitm status", "r4u-mitm deliver", "r4u-mitm backfill",
                    "r4u-mitm dead-letters list|retry|export"):
        assert command in ours
    assert "usage:" not in ours and "--set option[=value]" in theirs  # then mitmproxy's own help


@pytest.fixture
def dead(tmp_path, fake):
    """A spool whose deliverer dead-lettered four exchanges: two R4U's parser crashed on (once is
    enough here: --max-attempts 1), one it refused (422), and one whose record cannot be built;
    and delivered one. The one refused came gzipped with a key in its body (stored as it came)."""
    box = tmp_path / "outbox.sqlite"
    crashing = [exchange(), exchange()]
    refused = exchange(response_headers=[("content-type", "application/json"), ("content-encoding", "gzip")],
                       pieces=[gzip.compress(json.dumps({"api_key": KEY, "note": BODY_MARK}).encode())])
    broken, fine = exchange(), exchange()
    fake.reject(lambda r: r["metadata"]["trace_id"] in {ex.trace_id for ex in crashing}, 500, CRASH)
    spool_in(box, crashing + [fine])
    with Deliverer(box, fake.url, "--max-attempts", "1", "--in-flight", "1"):  # one by one: in this order
        until(lambda: read_stats(box)["dead_lettered"] == 2 and read_stats(box)["pending"] == 0)
        fake.reject(lambda r: r["metadata"]["trace_id"] == refused.trace_id)
        spool_in(box, [refused])
        until(lambda: read_stats(box)["dead_lettered"] == 3)
        spool_in(box, [broken], {**OPTIONS, "no_such_option": True})
        until(lambda: read_stats(box)["dead_lettered"] == 4 and read_stats(box)["pending"] == 0)
    fake.clear_faults()
    return SimpleNamespace(box=box, crashing=crashing, refused=refused, broken=broken, fine=fine)


def test_status_groups_the_dead_letters_by_reason(dead):
    box = dead.box
    out = r4u_mitm("status", "--outbox", str(box)).stdout
    head, _, groups = out.partition("dead letters by reason (r4u-mitm dead-letters list|retry|export --reason TEXT):\n")
    assert "dead_letter_kept: 4" in head
    lines = [line.split(None, 1) for line in groups.strip().splitlines()]
    assert lines[0] == ["2", f"HTTP 500: {CRASH}"]  # the most frequent first
    assert sorted(lines[1:]) == [["1", "HTTP 422: body: Value error, rejected by the fake"],
                                 ["1", "cannot build the record: TypeError: build_record() got an unexpected "
                                       "keyword argument 'no_such_option'"]]
    as_json = json.loads(r4u_mitm("status", "--outbox", str(box), "--json").stdout)
    assert as_json["dead_letter_reasons"][0] == {"status": 500, "reason": f"HTTP 500: {CRASH}", "count": 2}


def test_list_shows_each_dead_letter_and_filters_by_reason(dead):
    box, crashing, refused, broken = dead.box, dead.crashing, dead.refused, dead.broken
    run = r4u_mitm("dead-letters", "list", "--outbox", str(box))
    header, *rows = run.stdout.strip().splitlines()
    assert header.split() == ["trace", "id", "dead-lettered", "(UTC)", "status", "attempts", "reason"]
    fields = [row.split(None, 5) for row in rows]
    assert [f[0] for f in fields] == [crashing[0].trace_id, crashing[1].trace_id, refused.trace_id, broken.trace_id]
    assert [(f[3], f[4], f[5]) for f in fields[1:3]] == [
        ("500", "1", f"HTTP 500: {CRASH}"), ("422", "1", "HTTP 422: body: Value error, rejected by the fake")]
    assert fields[3][3] == "-"  # no answer from R4U: never posted
    assert run.stderr.strip() == f"4 dead letter(s) in {box}"
    only = r4u_mitm("dead-letters", "list", "--outbox", str(box), "--reason", "internal ERROR")
    assert [row.split()[0] for row in only.stdout.strip().splitlines()[1:]] == [ex.trace_id for ex in crashing]
    assert "2 dead letter(s) matching 'internal ERROR'" in only.stderr
    none = r4u_mitm("dead-letters", "list", "--outbox", str(box), "--reason", "no such reason")
    assert none.stdout == "" and none.stderr.startswith("0 dead letter(s)")
    assert BODY_MARK not in run.stdout + only.stdout


def test_export_writes_the_records_as_they_would_be_posted_redacted(dead, tmp_path):
    box, crashing, refused, broken = dead.box, dead.crashing, dead.refused, dead.broken
    run = r4u_mitm("dead-letters", "export", "--outbox", str(box), check=False)
    assert run.returncode == 1  # one record could not be built: said, the others exported
    assert f"trace {broken.trace_id}: cannot build its record: TypeError" in run.stderr
    assert "3 record(s) exported to stdout; 1 could not be built" in run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["metadata"]["trace_id"] for r in records] == [ex.trace_id for ex in crashing + [refused]]
    kept = read_dead_letters(box, bodies=True)
    assert [json.loads(build(item["raw"])) for item in kept[:3]] == records  # the deliverer's builder
    assert all(r["request_headers"]["authorization"] == "[REDACTED]" for r in records)
    assert json.loads(records[2]["response"]) == {"api_key": "[REDACTED]", "note": BODY_MARK}  # gunzipped, redacted
    assert KEY not in run.stdout and KEY not in run.stderr

    out = tmp_path / "export.jsonl"
    to_file = r4u_mitm("dead-letters", "export", "--outbox", str(box), "--reason", "HTTP 500", "--output", str(out))
    assert to_file.stdout == "" and f"2 record(s) matching 'HTTP 500' exported to {out}" in to_file.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # prompts and answers: private
    assert [json.loads(line) for line in out.read_text().splitlines()] == records[:2]
    assert read_stats(box)["dead_letter_kept"] == 4  # exporting takes nothing away


def test_retry_sends_them_again_through_the_running_deliverer(dead, fake):
    box, crashing, refused, broken = dead.box, dead.crashing, dead.refused, dead.broken
    with Deliverer(box, fake.url, "--max-attempts", "1") as d:
        until(lambda: read_stats(box)["deliverer"].get("pid") == d.proc.pid, what="the deliverer running")
        run = r4u_mitm("dead-letters", "retry", "--outbox", str(box), "--reason", "parsing")
        assert f"2 dead letter(s) matching 'parsing' back among the pending traces of {box}; its deliverer " \
               f"(pid {d.proc.pid}) posts them now" in run.stderr
        until(lambda: read_stats(box)["delivered"] == 3, what="the two sent again, and taken (R4U fixed)")
        state = read_stats(box)
    once_each(fake, [ex.trace_id for ex in crashing] + [dead.fine.trace_id])
    assert state["pending"] == 0 and state["dead_letter_kept"] == 2
    assert {d["trace_id"] for d in read_dead_letters(box)} == {refused.trace_id, broken.trace_id}


def test_retry_with_no_deliverer_leaves_them_pending_and_says_so(dead):
    box, crashing, refused, broken = dead.box, dead.crashing, dead.refused, dead.broken
    run = r4u_mitm("dead-letters", "retry", "--outbox", str(box))
    assert "4 dead letter(s) back among the pending traces" in run.stderr and "no deliverer runs on it" in run.stderr
    state = read_stats(box)
    assert state["pending"] == 4 and state["dead_letter_kept"] == 0 and state["oldest_attempts"] == 0
    with Spool(box) as spool:
        rows = spool.claim(10)
    assert [r.trace_id for r in rows] == [ex.trace_id for ex in crashing + [refused, broken]]
    assert all(r.attempts == r.failures == 0 for r in rows)  # a fresh start: max attempts posts again


def test_dead_letters_bad_input(tmp_path, dead):
    box = dead.box
    missing = r4u_mitm("dead-letters", "list", "--outbox", str(tmp_path / "nothing.sqlite"), check=False)
    assert missing.returncode == 1 and "no outbox at" in missing.stderr
    assert not (tmp_path / "nothing.sqlite").exists()
    for args, message in [(["list", "--output", "x.jsonl"], "--output goes with export"),
                          (["forget"], "invalid choice: 'forget'"), ([], "the following arguments are required")]:
        run = r4u_mitm("dead-letters", *args, "--outbox", str(box), check=False)
        assert run.returncode == 2 and message in run.stderr
    assert read_stats(box)["dead_letter_kept"] == 4
