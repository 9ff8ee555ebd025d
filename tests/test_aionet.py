"""The deliverer's httpx client on `aionet` (httpcore's network backend on asyncio streams), against
a small HTTP/1.1 server on real sockets: keep-alive, a connection R4U closed while idle, big bodies
both ways, timeouts and refusals as httpx's own exceptions, no cookies kept."""

import argparse
import asyncio

import httpx
import pytest

from r4u_mitm.delivery import aionet, deliver, policy
from tests.harness import free_port


def client(url: str):
    opts = argparse.Namespace(ca_file=None, in_flight=2)
    return deliver._client(url, opts, {"User-Agent": "test"}, httpx.Timeout(5.0))


class Server:
    """HTTP/1.1, Content-Length bodies; answers each request with `answer(request)`:
    (status, extra header lines, body), or None to close the connection without an answer."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "Server":
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        for writer in self.writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                answer = await self.answer((head, body))
                if answer is None:
                    writer.close()
                    return
                status, headers, content = answer
                writer.write(b"HTTP/1.1 %d X\r\n%sContent-Length: %d\r\n\r\n%s"
                             % (status, b"".join(h + b"\r\n" for h in headers), len(content), content))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass


async def created(status: int = 201):
    async def answer(request):
        return status, [], b'{"id": 1}'

    return answer


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture
def streams(monkeypatch):
    """Every connection aionet makes, in order (the pool must use it)."""
    made = []
    real = aionet.Backend.connect_tcp

    async def recorded(self, *args, **kwargs):
        made.append(await real(self, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(aionet.Backend, "connect_tcp", recorded)
    return made


def test_posts_share_one_kept_alive_connection_through_aionet(streams):
    async def main():
        async with Server(await created()) as server:
            async with client(server.url) as c:
                for i in range(5):
                    response = await c.post(server.url + "/v1/http-traces", content=b"record %d" % i)
                    assert (response.status_code, response.json()) == (201, {"id": 1})
            return server

    server = run(main())
    assert len(streams) == 1 and server.connections == 1  # the backend is in use, and keeps connections
    assert [body for _, body in server.requests] == [b"record %d" % i for i in range(5)]


def test_a_connection_r4u_closed_while_idle_is_replaced_without_an_error(streams):
    async def main():
        async with Server(await created()) as server:
            async with client(server.url) as c:
                assert (await c.post(server.url, content=b"one")).status_code == 201
                for writer in server.writers:  # R4U restarted, or timed the kept-alive connection out
                    writer.close()
                while not streams[0].get_extra_info("is_readable"):  # its end seen, without a syscall
                    await asyncio.sleep(0.01)
                assert (await c.post(server.url, content=b"two")).status_code == 201
            return server

    server = run(main())
    assert len(streams) == server.connections == 2 and [b for _, b in server.requests] == [b"one", b"two"]


def test_big_bodies_both_ways_arrive_whole():
    big = bytes(range(256)) * (8 * 4096)  # 8 MiB: the transport's and the reader's buffers fill

    async def echo(request):
        return 201, [], request[1]

    async def main():
        async with Server(echo) as server:
            async with client(server.url) as c:
                response = await c.post(server.url, content=big)
                return response.content

    assert run(main()) == big


def test_no_answer_in_time_is_httpx_read_timeout():
    async def never(request):
        await asyncio.sleep(60)

    async def main():
        async with Server(never) as server:
            async with client(server.url) as c:
                with pytest.raises(httpx.ReadTimeout):
                    await c.post(server.url, content=b"x", timeout=httpx.Timeout(5.0, read=0.2))

    run(main())


def test_a_connection_closed_without_an_answer_is_a_protocol_error():
    async def hang_up(request):
        return None

    async def main():
        async with Server(hang_up) as server:
            async with client(server.url) as c:
                with pytest.raises(httpx.RemoteProtocolError):
                    await c.post(server.url, content=b"x")

    run(main())


def test_nobody_listening_is_httpx_connect_error_with_the_os_reason():
    async def main():
        async with client("http://127.0.0.1") as c:
            with pytest.raises(httpx.ConnectError) as caught:
                await c.post(f"http://127.0.0.1:{free_port()}/v1/http-traces", content=b"x")
        return caught.value

    text = policy.describe(run(main()))  # what the log and `r4u-mitm status` say
    assert text.startswith("ConnectError: ") and "(Connection refused)" in text


def test_cookies_r4u_sets_are_not_sent_back():
    async def cookie(request):
        return 201, [b"Set-Cookie: session=abc; Path=/"], b"{}"

    async def main():
        async with Server(cookie) as server:
            async with client(server.url) as c:
                await c.post(server.url + "/v1/http-traces", content=b"1")
                await c.post(server.url + "/v1/http-traces", content=b"2")
                return server, c.cookies

    server, cookies = run(main())
    assert not cookies and all(b"cookie" not in head.lower() for head, _ in server.requests)


class Recorder:
    """A transport that records what is written, for the stream alone."""

    def __init__(self) -> None:
        self.writes: list[tuple[bytes, ...]] = []

    def writelines(self, data) -> None:
        self.writes.append(tuple(data))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def test_a_request_head_leaves_with_its_body_and_a_lone_head_before_the_read():
    async def main():
        stream = aionet.Stream(asyncio.get_running_loop())
        transport = Recorder()
        stream.connection_made(transport)
        await stream.write(b"POST / HTTP/1.1\r\n\r\n")
        assert transport.writes == []
        await stream.write(b"body")
        await stream.write(b"")  # h11's end of a Content-Length body
        assert transport.writes == [(b"POST / HTTP/1.1\r\n\r\n", b"body")]
        await stream.write(b"GET /health HTTP/1.1\r\n\r\n")
        stream.data_received(b"HTTP/1.1 200 OK\r\n")
        assert await stream.read(1024) == b"HTTP/1.1 200 OK\r\n"
        assert transport.writes[1:] == [(b"GET /health HTTP/1.1\r\n\r\n",)]

    run(main())
