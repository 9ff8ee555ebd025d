"""Content-Encoding decoding: incremental and bounded. Pure: no I/O, no mitmproxy.

Codings (RFC 9110 §8.4.1, registry at IANA "HTTP Content Coding Registry"): identity, gzip /
x-gzip, deflate (zlib-wrapped or raw, as browsers accept), br (``brotli``), zstd
(``compression.zstd`` on Python 3.14+, else ``backports.zstd``; mitmproxy 12 depends on both
Brotli and backports.zstd). "gzip, br" means gzip was applied first, so decoding runs br, then gzip.

Bound: output stops at ``limit`` bytes; after that ``truncated`` is set and decoding stops.
Every decompress call gets at most ``_CHUNK`` bytes of input and is asked for at most ``_CHUNK``
bytes of output (zlib/zstd ``max_length``; brotli ``output_buffer_limit``, which brotli 1.2 rounds
up to its next buffer block: one call returns < 2 * _CHUNK + 32 KiB, and the overshoot is kept and
handed out by later pulls). Stages are pulled, not pushed: a stage gets more input only once it
has handed out all it could make of the last. So, whatever the compression ratio, Python-side
memory is ~ limit + one piece + a few chunks (the ``b"".join`` of one ``feed``'s output briefly
doubles what that call produced). The libraries add their own windows, fixed per decoder and
independent of the ratio: zlib 32 KiB, zstd at most 8 MiB (``window_log_max=23``, the limit
RFC 9659 sets for HTTP; larger frames are rejected), brotli a ring buffer of at most the stream's
window (16 MiB for standard, non-"large window" streams).

Bad input, defined:
* unknown coding in the header: raw bytes pass through (still bounded by ``limit``),
  ``error = "unsupported content-encoding: X"``.
* the declared coding fails (error, or the stream ends) before any byte was decoded: it lied;
  the raw bytes seen so far and all later ones pass through, ``error`` says so.
* corrupt data after some output: output stops, what was decoded is kept, ``error`` set. zlib
  drops a failing call's whole output, so gzip/deflate replay that call to keep every byte
  decoded before the corrupt one (a small body fails in its first call: it still decodes).
* stream ends early (``finish()`` before the end of the compressed data) after some output:
  output is kept, ``error = "truncated gzip stream"`` (or deflate/br/zstd).
* bytes after the end of a deflate/br stream: an error like corrupt data. gzip members and zstd
  frames may be concatenated (RFC 1952 §2.2, RFC 8878 §3), so trailing bytes start a new one.
Errors are short, fixed texts plus the library's own message; never body bytes.
"""

from __future__ import annotations

import sys
import zlib

import brotli

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

_CHUNK = 64 * 1024  # most bytes asked from one decompress call

_GZIP = zlib.MAX_WBITS | 16  # gzip header and trailer
_ZLIB = zlib.MAX_WBITS  # zlib header (RFC 1950)
_RAW = -zlib.MAX_WBITS  # bare deflate (RFC 1951)


class _Corrupt(Exception):
    """Input a stage cannot decode (our own checks; library errors are caught alongside)."""


_LIBRARY_ERRORS = (zlib.error, brotli.error, zstd.ZstdError, _Corrupt)


class _StageError(Exception):
    """A stage failed; carries its coding name and a short message (no body bytes)."""

    def __init__(self, name: str, error: Exception) -> None:
        super().__init__(name)
        self.name = name
        self.message = str(error)[:100] or type(error).__name__


class _Stage:
    """Input waiting for one decoder. It is handed to the library at most ``_CHUNK`` bytes at a
    time (memoryview slices, no copies): the library then never sees far past the output asked
    for, so one call cannot run ahead into megabytes of output or into later corruption."""

    name = ""

    def __init__(self) -> None:
        self._in = memoryview(b"")

    def push(self, data: bytes) -> None:
        # A stage asks for more only once starved, so _in is empty here, except while deflate
        # waits for its 2 header bytes: the copy is of at most 1 byte in practice.
        self._in = memoryview(bytes(self._in) + data if self._in else data)

    def pull(self, n: int) -> bytes:
        """Up to ``n`` decoded bytes; b"" when it needs more input (or is done)."""
        raise NotImplementedError

    def done(self) -> bool:
        """The compressed stream ended properly and no input is left over."""
        raise NotImplementedError

    def _take(self) -> memoryview:
        data, self._in = self._in[:_CHUNK], self._in[_CHUNK:]
        return data


class _Zlib(_Stage):
    """gzip (consecutive members, RFC 1952 §2.2) or deflate (zlib-wrapped or raw)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._d = zlib.decompressobj(_GZIP) if name == "gzip" else None
        self._tail = b""  # input zlib handed back: unconsumed_tail or the next member's start

    def pull(self, n: int) -> bytes:
        if self._d is None:  # deflate: zlib-wrapped if the first 2 bytes are a zlib header
            if len(self._in) < 2:
                return b""
            cmf, flg = self._in[0], self._in[1]
            wrapped = cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0  # RFC 1950 §2.2
            self._d = zlib.decompressobj(_ZLIB if wrapped else _RAW)
        while True:
            if self._d.eof:
                if not self._d.unused_data and not self._in:
                    return b""
                if self.name != "gzip":
                    raise _Corrupt(f"data after the end of the {self.name} stream")
                self._tail = self._d.unused_data + self._tail
                self._d = zlib.decompressobj(_GZIP)  # next member
            data = self._tail or self._take()
            if not data:
                return b""
            before = self._d.copy()
            try:
                out = self._d.decompress(data, n)
                self._tail = self._d.unconsumed_tail
            except zlib.error:
                out = self._salvage(before, data, n)
            if out:
                return out

    def _salvage(self, d, data: memoryview | bytes, n: int) -> bytes:
        """zlib drops a whole call's output when it meets corrupt input (a small body fails in
        its first call, and would be taken for a lie): replay the call from the state `d`
        before it, 1 KiB then 1 byte at a time, and keep what decoded before the corrupt byte.
        The input from there on waits in `_tail`: the next call meets the corruption again,
        with nothing before it, and raises."""
        out: list[bytes] = []
        size = pos = 0
        step = 1024
        while pos < len(data) and size < n and not d.eof:
            piece = data[pos:pos + step]
            saved = d.copy()
            try:
                made = d.decompress(piece, n - size)
            except zlib.error:
                if step == 1 and not size:
                    raise  # nothing decoded before it
                d = saved
                if step == 1:
                    break
                step = 1
                continue
            out.append(made)
            size += len(made)
            pos += len(piece) if d.eof else len(piece) - len(d.unconsumed_tail)
        self._d, self._tail = d, bytes(data[pos:])
        return b"".join(out)

    def done(self) -> bool:
        d = self._d
        return d is not None and d.eof and not d.unused_data and not self._tail and not self._in


class _Brotli(_Stage):
    name = "br"

    def __init__(self) -> None:
        super().__init__()
        self._d = brotli.Decompressor()
        self._over = memoryview(b"")  # output made beyond what was asked (see module docstring)

    def pull(self, n: int) -> bytes:
        while not self._over:
            if self._d.is_finished():
                if self._in:
                    raise _Corrupt("data after the end of the br stream")
                return b""
            # brotli takes only empty input until it can accept more, and may hold output even
            # then: an empty call hands it out.
            data = self._take() if self._d.can_accept_more_data() else b""
            out = self._d.process(data, output_buffer_limit=n)
            if not out and not data:
                return b""
            self._over = memoryview(out)
        out, self._over = self._over[:n], self._over[n:]
        return bytes(out)

    def done(self) -> bool:
        return self._d.is_finished() and not self._in and not self._over


class _Zstd(_Stage):
    """zstd, consecutive frames (RFC 8878 §3), window at most 8 MB (RFC 9659)."""

    name = "zstd"

    def __init__(self) -> None:
        super().__init__()
        self._d = _zstd_decompressor()
        self._tail = b""  # the next frame's start

    def pull(self, n: int) -> bytes:
        while True:
            if self._d.eof:
                if not self._d.unused_data and not self._in:
                    return b""
                self._tail = self._d.unused_data
                self._d = _zstd_decompressor()  # next frame
            data = b""  # the decompressor still holds input: ask for its output first
            if self._d.needs_input:
                data, self._tail = self._tail or self._take(), b""
                if not data:
                    return b""
            out = self._d.decompress(data, n)
            if out or not (data or self._d.needs_input):
                return out

    def done(self) -> bool:
        return self._d.eof and not self._d.unused_data and not self._tail and not self._in


def _zstd_decompressor() -> zstd.ZstdDecompressor:
    return zstd.ZstdDecompressor(options={zstd.DecompressionParameter.window_log_max: 23})


_STAGES = {
    "gzip": lambda: _Zlib("gzip"),
    "x-gzip": lambda: _Zlib("gzip"),
    "deflate": lambda: _Zlib("deflate"),
    "br": _Brotli,
    "zstd": _Zstd,
}
_IDENTITY = ("", "identity", "none")


class BodyDecoder:
    """Decode one body with one Content-Encoding header value, piece by piece, up to ``limit``
    bytes of output."""

    def __init__(self, content_encoding: str | None, limit: int) -> None:
        self.truncated = False  # decoded output reached `limit`; the rest was dropped
        self.error: str | None = None
        self._limit = limit
        self._size = 0  # bytes handed out so far
        self._stopped = False  # after a corrupt stream or truncation: drop everything
        self._raw: list[bytes] | None = None  # raw input kept until the first decoded byte
        self._raw_size = 0
        codings = _codings(content_encoding)
        self._header = ", ".join(codings)
        self._stages: list[_Stage] = []  # in decoding order
        for coding in reversed(codings):  # last applied, first decoded
            stage = _STAGES.get(coding)
            if stage is None:
                self.error = f"unsupported content-encoding: {coding}"[:100]
                self._stages = []
                return
            self._stages.append(stage())
        if self._stages:
            self._raw = []

    def feed(self, piece: bytes) -> bytes:
        """Decoded bytes for this piece (maybe empty: decoders hold partial blocks)."""
        if self._stopped or not piece:
            return b""
        if not self._stages:
            return self._pass(bytes(piece))
        piece = bytes(piece)
        if self._raw is not None and self._raw_size <= self._limit:
            self._raw.append(piece)  # at most one piece past `limit`: enough to flag truncation
            self._raw_size += len(piece)
        self._stages[0].push(piece)
        return self._drain()

    def finish(self) -> bytes:
        """End of body: report a stream that stopped short."""
        if self._stopped or not self._stages:
            return b""
        ended = next((s for s in self._stages if not s.done()), None)
        if ended is None or (self._raw is not None and self._raw_size == 0):
            return b""  # complete, or an empty body
        if self._size == 0:
            return self._fall_back(f"{ended.name}: stream ended early")
        self.error = f"truncated {ended.name} stream"
        self._stop()
        return b""

    # -- internals -----------------------------------------------------------------------------

    def _drain(self) -> bytes:
        """Pull decoded output until the stages need more input or `limit` is reached."""
        out: list[bytes] = []
        try:
            while True:
                room = self._limit - self._size
                chunk = self._pull(len(self._stages) - 1, min(room, _CHUNK) or 1)
                if not chunk:
                    break
                if room == 0:  # a byte beyond the limit exists: truncate, stop decoding
                    self.truncated = True
                    self._stop()
                    break
                out.append(chunk)
                self._size += len(chunk)
                self._raw = None  # it decodes: no fallback any more
        except _StageError as e:
            if self._size == 0:
                return self._fall_back(f"{e.name}: {e.message}")
            self.error = f"corrupt {e.name} stream: {e.message}"
            self._stop()
        return b"".join(out)

    def _pull(self, i: int, n: int) -> bytes:
        """Up to `n` decoded bytes from stage `i`, refilling it from stage i-1 when it starves."""
        stage = self._stages[i]
        while True:
            try:
                out = stage.pull(n)
            except _LIBRARY_ERRORS as e:
                raise _StageError(stage.name, e) from None
            if out or i == 0:
                return out
            more = self._pull(i - 1, _CHUNK)
            if not more:
                return b""
            stage.push(more)

    def _fall_back(self, why: str) -> bytes:
        """The declared coding did not decode and nothing came out: pass the raw bytes through."""
        self.error = (
            f"content-encoding {self._header!r} did not decode, raw bytes passed through ({why})"
        )
        raw = b"".join(self._raw or [])
        self._stages = []
        self._raw = None
        return self._pass(raw)

    def _pass(self, data: bytes) -> bytes:
        room = self._limit - self._size
        if len(data) > room:
            self.truncated = True
            self._stop()
            data = data[:room]
        self._size += len(data)
        return data

    def _stop(self) -> None:
        self._stopped = True
        self._stages = []
        self._raw = None


def is_identity(content_encoding: str | None) -> bool:
    """No content coding (none, or identity): a body decodes to its raw bytes."""
    return not _codings(content_encoding)


def _codings(content_encoding: str | None) -> list[str]:
    """Header value → codings in the order they were applied; identity dropped."""
    if not content_encoding:
        return []
    codings = (c.strip().lower() for c in content_encoding.split(","))
    return [c for c in codings if c not in _IDENTITY]


def decode_body(
    content_encoding: str | None, raw: bytes, limit: int
) -> tuple[bytes, bool, str | None]:
    """Whole-body convenience over BodyDecoder: (decoded, truncated, error)."""
    decoder = BodyDecoder(content_encoding, limit)
    out = decoder.feed(raw)
    tail = decoder.finish()
    return (out + tail if tail else out), decoder.truncated, decoder.error
