"""httpcore's network backend on asyncio's own transports, for the deliverer's httpx client.

httpcore speaks HTTP (h11) over whatever byte streams its backend gives it; its default backend
goes through anyio, whose cancel scopes, typed attributes and per-check socket polls cost about a
quarter of what httpx spends on a post. Here a connection is an `asyncio.Protocol`: bytes arrive
by callback into a buffer, a read waits on one future (its timeout one timer), and whether an
idle kept-alive connection was closed by R4U is known from the callbacks, without a syscall. A
request's head is held until its body follows, so both leave in one segment (one wake-up of R4U).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Iterable

import httpcore

READ_HIGH = 256 * 1024  # bytes buffered before the socket is no longer read (until httpcore reads)
HAPPY_EYEBALLS = 0.25   # seconds before the next address of a host is tried (as anyio's default)


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Stream(asyncio.Protocol, httpcore.AsyncNetworkStream):
    """One connection, as a protocol (asyncio's side) and a network stream (httpcore's)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._eof = False
        self._error: Exception | None = None
        self._readable: asyncio.Future | None = None
        self._writable: asyncio.Future | None = None  # set while the transport's buffer is full
        self._held = b""

    # asyncio's side ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > READ_HIGH and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        self._readable = _wake(self._readable)

    def eof_received(self) -> bool:
        self._eof = True
        self._readable = _wake(self._readable)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._readable = _wake(self._readable)
        self._writable = _wake(self._writable)

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        self._writable = _wake(self._writable)

    # httpcore's side ---------------------------------------------------------------------------

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._held:
            self._send()
        if not self._chunks and not self._eof:
            self._readable = self._loop.create_future()
            if not await _within(self._loop, self._readable, timeout):
                raise httpcore.ReadTimeout("timed out")
        if self._chunks:
            data = self._chunks.popleft()
            if len(data) > max_bytes:
                self._chunks.appendleft(data[max_bytes:])
                data = data[:max_bytes]
            self._buffered -= len(data)
            if self._reading_paused and self._buffered <= READ_HIGH // 2:
                self._reading_paused = False
                self._transport.resume_reading()
            return data
        if self._error is not None:
            raise httpcore.ReadError(str(self._error) or type(self._error).__name__) from self._error
        return b""  # closed by the server

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._transport.is_closing():
            raise httpcore.WriteError(self._why_closed())
        if not self._held:
            self._held = buffer  # sent with the next write, or before the next read
            return
        self._send(buffer)
        if self._writable is not None:
            if not await _within(self._loop, self._writable, timeout):
                raise httpcore.WriteTimeout("timed out")
            if self._transport.is_closing():
                raise httpcore.WriteError(self._why_closed())

    def _send(self, more: bytes = b"") -> None:
        held, self._held = self._held, b""
        self._transport.writelines((held, more) if more else (held,))

    def _why_closed(self) -> str:
        return str(self._error) if self._error else "connection closed"

    async def aclose(self) -> None:
        self._held = b""
        self._transport.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> Stream:
        try:
            async with asyncio.timeout(timeout):
                self._transport = await self._loop.start_tls(self._transport, self, ssl_context,
                                                             server_hostname=server_hostname)
        except TimeoutError as exc:
            self._transport.close()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from exc
        except OSError as exc:  # ssl.SSLError among them: a certificate not verified
            self._transport.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return self

    def get_extra_info(self, info: str):
        if info == "is_readable":  # idle, yet readable: R4U closed it (or broke HTTP)
            return self._eof or bool(self._chunks)
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info in ("ssl_object", "socket"):
            return self._transport.get_extra_info(info)
        return None


def _wake(waiter: asyncio.Future | None) -> None:
    """Resolve a waiter (None: nobody waits); always None, for the caller's attribute."""
    if waiter is not None and not waiter.done():
        waiter.set_result(True)
    return None


async def _within(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future, timeout: float | None) -> bool:
    """False when `timeout` seconds passed first (one timer, no task or cancel scope)."""
    if timeout is None:
        return await waiter
    timer = loop.call_later(timeout, _expire, waiter)
    try:
        return await waiter
    finally:
        timer.cancel()


class Backend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[tuple] | None = None) -> Stream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, stream = await loop.create_connection(
                    lambda: Stream(loop), host, port, happy_eyeballs_delay=HAPPY_EYEBALLS,
                    local_addr=None if local_address is None else (local_address, 0))
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout("timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = transport.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return stream

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
