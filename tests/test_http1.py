"""r4u_mitm.http1 over real sockets: the fake R4U (plain and TLS) and a raw asyncio server for the
edge cases (chunked answers, Connection: close, idle connections closed by the server, hangs)."""

import asyncio
import json
import ssl

import pytest

from r4u_mitm import http1
from r4u_mitm.sender import _ssl_context
from tests.fakes.r4u import FakeR4U
from tests.fakes.upstream import make_cert

RECORD = {
    "started_at": "2026-01-01T00:00:00+00:00", "completed_at": "2026-01-01T00:00:01+00:00", "status_code": 200,
    "request": "{}", "request_headers": {}, "response": "{}", "response_headers": {}, "metadata": {"trace_id": "t"},
}
JSON = {"Content-Type": "application/json"}


def run(coro, timeout: float = 30):
    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())


@pytest.fixture
def fake():
    server = FakeR4U().start()
    yield server
    server.stop()


class Raw:
    """A raw HTTP/1.1 server: `answer(head)` returns the bytes to send back for a request head
    (None: close without answering). Counts connections and requests."""

    def __init__(self, answer):
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        for writer in self.writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer):
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                reply = self.answer(len(self.requests), head)
                if asyncio.iscoroutine(reply):
                    reply = await reply
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
                if b"connection: close" in reply.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


def test_posts_to_the_fake_over_one_kept_alive_connection(fake):
    async def main():
        client = http1.Client(headers={"User-Agent": "r4u-mitm/test", "X_API_KEY": "k"}, timeout=5)
        url = http1.URL(fake.url + "/v1/http-traces")
        answers = []
        for n in range(5):
            body = json.dumps({**RECORD, "metadata": {"trace_id": f"t{n}"}}).encode()
            answers.append(await client.post(url, content=body, headers=JSON))
        listed = await client.get(fake.url + "/v1/traces?limit=1")
        missing = await client.get(fake.url + "/v1/nothing")
        await client.aclose()
        return answers, listed, missing

    answers, listed, missing = run(main())
    assert [a.status_code for a in answers] == [201] * 5
    assert answers[0].json()["metadata"] == {"trace_id": "t0"}
    assert answers[0].headers.get("Content-Type") == answers[0].headers.get("content-type") == "application/json"
    assert listed.status_code == 200 and listed.json()[0]["trace_id"] == "t4"  # newest first
    assert missing.status_code == 404 and missing.reason_phrase == "Not Found"
    assert fake.trace_ids() == [f"t{n}" for n in range(5)]
    assert fake.requests == 7
    post = fake.posts[0]
    assert post.headers["x_api_key"] == "k" and post.headers["user-agent"] == "r4u-mitm/test"
    assert post.headers["host"] == f"127.0.0.1:{fake.port}"


def test_keep_alive_reuses_the_connection_and_request_bytes_are_right():
    async def main():
        async with Raw(lambda n, head: ok()) as raw:
            client = http1.Client(headers={"User-Agent": "ua"})
            for _ in range(3):
                assert (await client.post(raw.url + "/v1/x?a=1", content=b"{}", headers=JSON)).json() == {"ok": True}
            await client.aclose()
            return raw

    raw = run(main())
    assert raw.connections == 1 and len(raw.requests) == 3
    lines = raw.requests[0].split(b"\r\n")
    assert lines[0] == b"POST /v1/x?a=1 HTTP/1.1"
    assert set(lines[1:-2]) == {b"Host: 127.0.0.1:%d" % int(raw.url.rsplit(":", 1)[1]), b"User-Agent: ua",
                                b"Content-Type: application/json", b"Content-Length: 2"}
    assert lines[-1] == b"{}"


def test_chunked_answer_with_extensions_and_trailers():
    chunked = (b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\nRetry-After: 7\r\n"
               b"Content-Type: application/json; charset=utf-8\r\n\r\n"
               b"5;ext=1\r\n{\"det\r\n0c\r\nail\": \"busy\"\r\n1\r\n}\r\n0\r\nx-trailer: y\r\n\r\n")

    async def main():
        async with Raw(lambda n, head: chunked if n == 1 else ok()) as raw:
            client = http1.Client()
            first = await client.post(raw.url + "/", content=b"x")
            second = await client.get(raw.url + "/")
            await client.aclose()
            return first, second, raw.connections

    first, second, connections = run(main())
    assert first.status_code == 503 and first.headers.get("RETRY-AFTER") == "7"
    assert first.json() == {"detail": "busy"} and first.text == '{"detail": "busy"}'
    assert second.status_code == 200 and connections == 1  # the chunked answer left the connection usable


def test_connection_close_is_honoured_and_a_new_connection_made():
    async def main():
        async with Raw(lambda n, head: ok(extra=b"Connection: close\r\n")) as raw:
            client = http1.Client()
            for _ in range(3):
                assert (await client.get(raw.url + "/")).status_code == 200
            await client.aclose()
            return raw.connections

    assert run(main()) == 3


def test_answer_delimited_by_close():
    async def main():
        async with Raw(lambda n, head: b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\nno length here") as raw:
            client = http1.Client()
            answer = await client.get(raw.url + "/")
            await client.aclose()
            return answer

    answer = run(main())
    assert answer.status_code == 400 and answer.content == b"no length here"
    with pytest.raises(ValueError):
        answer.json()


def test_a_connection_the_server_closed_while_idle_is_retried_once_on_a_fresh_one(monkeypatch):
    async def main():
        async with Raw(lambda n, head: ok()) as raw:
            client = http1.Client()
            assert (await client.post(raw.url + "/", content=b"1")).status_code == 200
            for writer in raw.writers:  # the server drops the idle connection...
                writer.transport.abort()
            # ...and the client does not notice before it writes (as when a FIN is still in flight)
            monkeypatch.setattr(http1._Connection, "usable", lambda self, now, expiry: True)
            answer = await client.post(raw.url + "/", content=b"2")
            await client.aclose()
            return answer, raw

    answer, raw = run(main())
    assert answer.status_code == 200 and raw.connections == 2
    assert [r.rsplit(b"\r\n", 1)[-1] for r in raw.requests] == [b"1", b"2"]


def test_an_answer_that_breaks_after_it_began_is_not_retried():
    async def main():
        async with Raw(lambda n, head: ok() if n == 1 else b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\nshort") as raw:
            client = http1.Client()
            await client.get(raw.url + "/")
            with pytest.raises(http1.TransportError):
                await client.get(raw.url + "/")
            await client.aclose()
            return raw

    raw = run(main())
    # the server answered "short" then waits for a next request; the client closed: 2 requests only
    assert len(raw.requests) == 2


def test_a_fresh_connection_closed_without_an_answer_is_an_error_not_a_retry():
    async def main():
        async with Raw(lambda n, head: None) as raw:
            client = http1.Client()
            with pytest.raises(http1.TransportError) as info:
                await client.post(raw.url + "/", content=b"x")
            await client.aclose()
            return info.value, raw

    error, raw = run(main())
    assert isinstance(error, OSError) and len(raw.requests) == 1


def test_timeout_covers_the_whole_exchange():
    async def hang(n, head):
        await asyncio.sleep(30)

    async def main():
        async with Raw(hang) as raw:
            client = http1.Client(timeout=0.3)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(http1.Timeout) as info:
                await client.post(raw.url + "/", content=b"x")
            elapsed = loop.time() - t0
            await client.aclose()
            return info.value, elapsed

    error, elapsed = run(main())
    assert isinstance(error, http1.TransportError) and isinstance(error, OSError)
    assert 0.25 <= elapsed < 2


def test_connection_refused_and_garbage_are_transport_errors():
    async def main():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        client = http1.Client()
        with pytest.raises(http1.TransportError) as refused:
            await client.get(f"http://127.0.0.1:{port}/")
        async with Raw(lambda n, head: b"SSH-2.0-OpenSSH\r\n\r\n") as raw:
            with pytest.raises(http1.TransportError, match="not an HTTP/1.1 answer"):
                await client.get(raw.url + "/")
        with pytest.raises(http1.TransportError, match="scheme"):
            await client.get("ftp://127.0.0.1/")
        await client.aclose()
        return refused.value

    refused = run(main())
    assert isinstance(refused.__cause__, ConnectionRefusedError)


def test_tls_with_the_ca_file_and_rejected_without_it(tmp_path):
    cert, key = make_cert(tmp_path)
    server = FakeR4U(tls=(cert, key)).start()
    try:
        assert server.url.startswith("https://")

        async def post(context):
            client = http1.Client(ssl_context=context, timeout=5)
            try:
                return await client.post(server.url + "/v1/http-traces", content=json.dumps(RECORD).encode(),
                                         headers=JSON)
            finally:
                await client.aclose()

        trusted = _ssl_context(cert)
        assert trusted.verify_mode == ssl.CERT_REQUIRED and trusted.check_hostname
        assert run(post(trusted)).status_code == 201
        with pytest.raises(http1.TransportError, match="CERTIFICATE_VERIFY_FAILED"):
            run(post(_ssl_context(None)))
        # a trusted certificate for another name is refused too: the hostname is checked
        named = http1.Client(ssl_context=trusted, timeout=5)

        async def by_other_name():
            url = http1.URL(server.url + "/v1/traces")
            url.host = "127.1"  # 127.0.0.1 to the resolver, a name not in the certificate to TLS
            try:
                return await named.get(url)
            finally:
                await named.aclose()

        with pytest.raises(http1.TransportError, match="CERTIFICATE_VERIFY_FAILED|match|mismatch"):
            run(by_other_name())
        assert server.trace_ids() == ["t"]
    finally:
        server.stop()


def test_response_helpers():
    answer = http1.Response(299, {"Retry-After": "3", "retry-after": "4"}, "é".encode("latin-1"), "Odd")
    assert answer.headers.get("retry-after") == "3, 4" and answer.headers.get("missing") is None
    assert answer.reason_phrase == "Odd" and answer.text == "\ufffd"
    latin = http1.Response(200, {"content-type": "text/plain; charset=latin-1"}, "é".encode("latin-1"))
    assert latin.text == "é" and latin.reason_phrase == "OK"
