"""Options the tracer cannot work with, for real: mitmdump refuses to start and says why, in one
sentence naming the option, instead of running a tracer that loses every trace; at runtime
(mitmweb's options API, as its options editor calls it) the change is refused and the working
delivery goes on.

What mitmproxy 12 does (seen here): when a script's `configure` raises `OptionsError` at startup,
mitmproxy logs "error in script ..." with the message and, as an error was logged during startup,
exits with code 1 ("Error logged during startup, exiting..."). A `--set r4u_...` value mitmproxy
itself cannot read (not a number for a number option) makes it drop the addon without a word and
run on; the addon notices and logs an error, so mitmproxy exits there too.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import traces_for
from tests.harness import LOADED, Mitmdump, free_port, wait_for


def refused(proxy: Mitmdump) -> str:
    """Run `proxy`, which must exit by itself, as a refused start; its log."""
    assert proxy.exit_code() == 1
    log = proxy.log()
    assert "Error logged during startup, exiting..." in log
    assert LOADED not in log and "internal error" not in log  # no tracer ran, not even half of one
    return log


def make_ca(confdir: Path) -> None:
    """mitmproxy's CA in `confdir`, as its first run leaves it (mitmproxy then only reads it)."""
    from mitmproxy.certs import CertStore

    CertStore.from_store(confdir, "mitmproxy", 2048)


def test_an_unwritable_confdir_is_refused(tmp_path):
    """The outbox's default place, mitmproxy's confdir, cannot be written. Root may write
    anywhere: as root, mitmdump runs without the capabilities that let root ignore file
    permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so the directory's mode holds for it
    as for any user."""
    confdir = tmp_path / "confdir"
    make_ca(confdir)
    confdir.chmod(0o500)
    ca_files = sorted(os.listdir(confdir))
    proxy = Mitmdump(tmp_path, confdir=confdir, options={"r4u_outbox": ""})  # "": the default, in confdir
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux): cannot make a directory unwritable")
        proxy.cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *proxy.cmd]
    log = refused(proxy)
    assert (f"r4u_outbox: cannot create {confdir}/r4u-outbox.sqlite: Permission denied "
            f"(set r4u_outbox or confdir to a writable place)") in log
    assert sorted(os.listdir(confdir)) == ca_files  # mitmproxy only read its CA: the failure is the outbox's


def test_a_file_that_is_not_an_outbox_is_refused_and_left_alone(tmp_path):
    proxy = Mitmdump(tmp_path)
    content = b"my notes, not a database\n" * 200
    proxy.outbox.write_bytes(content)
    log = refused(proxy)
    assert f"r4u_outbox: {proxy.outbox} is not an r4u-mitm outbox (not a SQLite database)" in log
    assert proxy.outbox.read_bytes() == content


def test_a_ca_file_that_is_not_pem_is_refused(tmp_path):
    ca = tmp_path / "r4u-ca.pem"
    ca.write_text("this is not a certificate\n")
    log = refused(Mitmdump(tmp_path, r4u_url="https://r4u.example:8443", options={"r4u_ca_file": ca}))
    assert (f"r4u_ca_file: {ca} is not a PEM CA bundle: "
            "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found") in log


@pytest.mark.parametrize("url, shown", [
    ("http://localhost:99999", "http://localhost:99999"),
    ("http://localhost:abc", "http://localhost:abc"),
    ("http://r4u:hunter2-secret@localhost:0x50/v1", "http://localhost:0x50/v1"),  # no password in the log
])
def test_a_malformed_r4u_url_is_refused(tmp_path, url, shown):
    log = refused(Mitmdump(tmp_path, r4u_url=url))
    assert f"r4u_api_url: invalid port in '{shown}'" in log
    assert "hunter2" not in log


def test_a_value_mitmproxy_cannot_read_is_not_a_silent_proxy_without_tracer(tmp_path):
    """mitmproxy itself drops the addon when it cannot read a `--set` value of one of its
    options (here: not a number); the addon says so, and mitmdump does not run on without it."""
    log = refused(Mitmdump(tmp_path, options={"r4u_max_body_bytes": "32MB"}))
    assert ("r4u-mitm is NOT running, nothing is traced: mitmproxy could not read --set r4u_max_body_bytes "
            "(a number option given something else, or an option given twice) and dropped the addon; "
            "fix it and restart") in log


@pytest.fixture
def mitmweb(tmp_path, upstream, r4u):
    web_port, password = free_port(), secrets.token_hex(16)
    with Mitmdump(tmp_path, r4u_url=r4u.url, upstream_port=upstream.port, program="mitmweb",
                  options={"web_open_browser": "false", "web_host": "127.0.0.1", "web_port": web_port,
                           "web_password": password}) as proc:
        wait_for(lambda: _listening(web_port), what="mitmweb's UI")
        # mitmweb wants its token, and the XSRF token as cookie and header alike (its UI's JS
        # copies the cookie into the header)
        xsrf = secrets.token_hex(16)
        with httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=10, cookies={"_mitmproxy_xsrf": xsrf},
                          headers={"Authorization": f"Bearer {password}", "X-XSRFToken": xsrf}) as web:
            yield proc, web


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_refused_change_at_runtime_leaves_the_tracer_working(mitmweb, tmp_path, r4u):
    proc, web = mitmweb
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("not a database\n")
    for option, value, message in [
        ("r4u_outbox", str(not_sqlite), f"r4u_outbox: {not_sqlite} is not an r4u-mitm outbox (not a SQLite database)"),
        ("r4u_api_url", "http://localhost:99999", "r4u_api_url: invalid port in 'http://localhost:99999'"),
    ]:
        answer = web.put("/options", json={option: value})
        assert answer.status_code == 400 and message in answer.text
    options = web.get("/options").json()
    assert options["r4u_outbox"]["value"] == str(proc.outbox) and options["r4u_api_url"]["value"] == r4u.url

    tag = uuid.uuid4().hex
    with httpx.Client(proxy=proc.url, verify=str(proc.ca_file)) as client:
        assert client.get("https://api.openai.com/v1/models", headers={"X-R4U-Test": tag}).status_code == 200
    (trace,) = traces_for(r4u, tag)  # delivered by the delivery that was in place
    assert trace["request_path"] == "/v1/models"
    assert "internal error" not in proc.log()
