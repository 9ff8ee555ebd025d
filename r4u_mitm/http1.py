"""A small asyncio HTTP/1.1 client for posting to R4U: cheap on the event loop it shares.

`Client` keeps up to `max_connections` idle keep-alive connections per origin (reused last-in,
first-out; dropped after `keepalive_expiry` seconds idle), speaks TLS through the given
`ssl.SSLContext` (the server's hostname is always passed for verification), and sends a request
as method, path+query, headers and body bytes. A response is read by Content-Length, by chunked
transfer-encoding, or until the server closes; `Connection: close` (or HTTP/1.0 without
keep-alive) is honoured. One timeout covers the whole exchange (connecting included).

Every failure (refused, reset, EOF, TLS, a malformed answer) is a `TransportError`, an `OSError`;
a timeout is its subclass `Timeout`. A kept-alive connection that fails before any byte of the
answer arrived (the server closed it while idle) is retried once on a fresh connection.
No proxies from the environment, no redirects, no compression, no cookies.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections import deque
from http import HTTPStatus
from urllib.parse import unquote, urlsplit

__all__ = ["Client", "Headers", "Response", "Timeout", "TransportError", "URL"]

MAX_HEAD = 64 * 1024              # status line + headers
MAX_BODY = 64 * 1024 * 1024       # an answer bigger than this is a protocol error
_NO_BODY = frozenset({204, 304})


class TransportError(OSError):
    """No (complete, well-formed) answer: connecting, TLS, the connection broke, or the server
    spoke something other than HTTP/1.1."""


class Timeout(TransportError):
    """No complete answer within the timeout."""


class Headers:
    """Response headers: case-insensitive; repeated fields joined with ", "."""

    __slots__ = ("_map",)

    def __init__(self, items=()) -> None:
        self._map: dict[str, str] = {}
        pairs = items.items() if isinstance(items, dict) else items
        for name, value in pairs:
            key = name.lower()
            self._map[key] = f"{self._map[key]}, {value}" if key in self._map else value

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._map.get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return self._map[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._map

    def items(self):
        return self._map.items()

    def __repr__(self) -> str:
        return f"Headers({self._map!r})"


class Response:
    __slots__ = ("status_code", "headers", "content", "_reason")

    def __init__(self, status_code: int, headers: Headers | dict | None = None, content: bytes = b"",
                 reason: str = "") -> None:
        self.status_code = status_code
        self.headers = headers if isinstance(headers, Headers) else Headers(headers or ())
        self.content = content
        self._reason = reason

    @property
    def reason_phrase(self) -> str:
        """The standard phrase for the status (whatever the server wrote), else the server's."""
        try:
            return HTTPStatus(self.status_code).phrase
        except ValueError:
            return self._reason

    @property
    def text(self) -> str:
        charset = "utf-8"
        for param in (self.headers.get("content-type") or "").split(";")[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "charset" and value.strip():
                charset = value.strip().strip('"')
        try:
            return self.content.decode(charset, errors="replace")
        except LookupError:
            return self.content.decode("utf-8", errors="replace")

    def json(self):
        """The body as JSON; ValueError when it is not."""
        return json.loads(self.content)

    def __repr__(self) -> str:
        return f"<Response [{self.status_code}]>"


class URL:
    """An absolute http(s) URL, parsed once: origin, request target, Host header, credentials."""

    __slots__ = ("scheme", "host", "port", "target", "host_header", "authorization")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme.lower()
        self.host = parts.hostname or ""
        default = 443 if self.scheme == "https" else 80
        self.port = parts.port or default  # ValueError on a bad port, as at parse time before
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = shown if self.port == default else f"{shown}:{self.port}"
        self.authorization = None
        if parts.username is not None or parts.password is not None:
            pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
            self.authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.target}"


class _Connection:
    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0

    def usable(self, now: float, expiry: float) -> bool:
        return (now - self.idle_since < expiry and not self.reader.at_eof()
                and not self.reader._buffer
                and not self.writer.is_closing())

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - closing is best effort (e.g. the loop is gone)
            pass


class _Stale(Exception):
    """A reused connection failed before any byte of the answer: try once more on a new one."""


class Client:
    """Keep-alive HTTP/1.1 over asyncio streams; see the module docstring."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, timeout: float = 10.0,
                 headers: dict[str, str] | None = None, max_connections: int = 8,
                 keepalive_expiry: float = 30.0) -> None:
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.max_idle = max_connections
        self.keepalive_expiry = keepalive_expiry
        self._headers = b"".join(_line(k, v) for k, v in (headers or {}).items())
        self._idle: dict[tuple, deque[_Connection]] = {}
        self._closed = False

    async def get(self, url: URL | str, headers: dict[str, str] | None = None) -> Response:
        return await self.request("GET", url, headers=headers)

    async def post(self, url: URL | str, content: bytes = b"", headers: dict[str, str] | None = None) -> Response:
        return await self.request("POST", url, content, headers)

    async def request(self, method: str, url: URL | str, content: bytes = b"",
                      headers: dict[str, str] | None = None) -> Response:
        if not isinstance(url, URL):
            url = URL(url)
        if url.scheme not in ("http", "https"):
            raise TransportError(f"unsupported URL scheme {url.scheme!r} (http or https)")
        if not url.host:
            raise TransportError("no host in the URL")
        if self._closed:
            raise TransportError("the client is closed")
        head = self._head(method, url, content, headers)
        try:
            async with asyncio.timeout(self.timeout):
                conn, reused = self._take(url.origin), True
                if conn is None:
                    conn, reused = await self._connect(url), False
                try:
                    return await self._exchange(conn, url, method, head, content, reused)
                except _Stale:
                    conn = await self._connect(url)
                    return await self._exchange(conn, url, method, head, content, False)
        except TimeoutError as exc:
            raise Timeout(f"no complete answer within {self.timeout:g}s") from exc

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    # Inside ---------------------------------------------------------------------------------------

    def _head(self, method: str, url: URL, content: bytes, headers: dict[str, str] | None) -> bytes:
        parts = [f"{method} {url.target} HTTP/1.1\r\nHost: {url.host_header}\r\n".encode("latin-1"), self._headers]
        if url.authorization:
            parts.append(_line("Authorization", url.authorization))
        for name, value in (headers or {}).items():
            parts.append(_line(name, value))
        if content or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            parts.append(b"Content-Length: %d\r\n" % len(content))
        parts.append(b"\r\n")
        return b"".join(parts)

    def _take(self, origin: tuple) -> _Connection | None:
        conns = self._idle.get(origin)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if conn.usable(now, self.keepalive_expiry):
                return conn
            conn.close()
        return None

    def _give_back(self, origin: tuple, conn: _Connection) -> None:
        conns = self._idle.setdefault(origin, deque())
        if self._closed or len(conns) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conns.append(conn)

    async def _connect(self, url: URL) -> _Connection:
        tls = url.scheme == "https"
        if tls and self.ssl_context is None:
            raise TransportError("https needs an ssl.SSLContext")
        try:
            reader, writer = await asyncio.open_connection(
                url.host, url.port, ssl=self.ssl_context if tls else None,
                server_hostname=url.host if tls else None, limit=MAX_HEAD)
        except (OSError, EOFError, ValueError) as exc:  # refused, unreachable, TLS (SSLError is an OSError)
            raise TransportError(" ".join(str(exc).split()) or type(exc).__name__) from exc
        return _Connection(reader, writer)

    async def _exchange(self, conn: _Connection, url: URL, method: str, head: bytes, content: bytes,
                        reused: bool) -> Response:
        got_bytes = False
        try:
            try:
                conn.writer.write(head + content if len(content) < 256 * 1024 else head)
                if len(content) >= 256 * 1024:
                    conn.writer.write(content)
                await conn.writer.drain()
                while True:
                    try:
                        raw = await conn.reader.readuntil(b"\r\n\r\n")
                    except asyncio.IncompleteReadError as exc:
                        got_bytes = got_bytes or bool(exc.partial)
                        raise TransportError("the server closed the connection without a complete answer"
                                             if exc.partial or not reused else "the server closed the connection"
                                             ) from exc
                    got_bytes = True
                    status, reason, headers, keep = _parse_head(raw)
                    if 100 <= status < 200 and status != 101:
                        continue  # an interim answer: the real one follows
                    break
                if method == "HEAD" or status in _NO_BODY or status == 101:
                    body = b""
                else:
                    body, keep = await _read_body(conn.reader, headers, keep)
            except TransportError:
                raise
            except asyncio.LimitOverrunError as exc:
                raise TransportError("a line of the answer is too long") from exc
            except (OSError, EOFError) as exc:  # reset, broken pipe, TLS (SSLError), EOF mid-body
                raise TransportError(" ".join(str(exc).split()) or type(exc).__name__) from exc
        except TransportError:
            conn.close()
            if reused and not got_bytes:
                raise _Stale from None
            raise
        except BaseException:  # a timeout, a cancellation: the connection is in an unknown state
            conn.close()
            raise
        if keep:
            self._give_back(url.origin, conn)
        else:
            conn.close()
        return Response(status, headers, body, reason)


def _line(name: str, value: str) -> bytes:
    if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
        raise ValueError(f"invalid header {name!r}")
    return f"{name}: {value}\r\n".encode("latin-1")


def _parse_head(raw: bytes) -> tuple[int, str, Headers, bool]:
    """(status, reason, headers, keep-alive) from a status line and header fields."""
    lines = raw[:-4].decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not (code.isascii() and code.isdigit()):
        raise TransportError(f"not an HTTP/1.1 answer: {lines[0][:60]!r}")
    pairs = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise TransportError(f"malformed header line in the answer: {line[:60]!r}")
        pairs.append((name, value.strip(" \t")))
    headers = Headers(pairs)
    tokens = {t.strip().lower() for t in (headers.get("connection") or "").split(",")}
    keep = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
    return int(code), reason, headers, keep


async def _read_body(reader: asyncio.StreamReader, headers: Headers, keep: bool) -> tuple[bytes, bool]:
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if coding.split(",")[-1].strip().lower() != "chunked":
            return await _read_to_eof(reader), False  # not chunked last: delimited by the close
        return await _read_chunked(reader), keep
    length = headers.get("content-length")
    if length is not None:
        values = {v.strip() for v in length.split(",")}
        if len(values) != 1 or not ((n := values.pop()).isascii() and n.isdigit()):
            raise TransportError("a bad Content-Length in the answer")
        size = int(n)
        if size > MAX_BODY:
            raise TransportError(f"the answer is too big ({size} bytes)")
        return (await reader.readexactly(size) if size else b""), keep
    return await _read_to_eof(reader), False


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks, total = [], 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line[:-2].split(b";", 1)[0].strip()
        if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
            raise TransportError("a bad chunk size in the answer")
        size = int(size_text, 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, ignored
                pass
            return b"".join(chunks)
        total += size
        if total > MAX_BODY:
            raise TransportError("the answer is too big")
        chunks.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise TransportError("a chunk not followed by CRLF in the answer")


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    chunks, total = [], 0
    while chunk := await reader.read(65536):
        total += len(chunk)
        if total > MAX_BODY:
            raise TransportError("the answer is too big")
        chunks.append(chunk)
    return b"".join(chunks)
