"""A chat event stream read at C speed: what ``SSEDecoder`` + ``StreamSummary`` say of it, exactly,
parsing only the few events that can change it. Pure: no I/O, no mitmproxy, no clock.

The full reading (record.py) parses every event: about 10 µs each. A chat stream's summary
depends on few of them: the events up to the first output (time to first token, model), and
those that name a finish reason, usage or an error, or are ``[DONE]``. Here the body is framed
with ``bytes.count``/``find`` and searched with regular expressions, window by window, and only
those events go, in order, through the same ``StreamSummary``. Anything unusual falls back (None):
another dialect, a content coding, a CR, a BOM, a field other than ``data``, a multi-line event,
runs of blank lines.

Why it is exact. The framing check proves that the framed part of the body (up to its last
blank line) is one-line blocks, each ``data:…`` or a ``:`` comment, each ended by one blank line,
and that there is no CR anywhere: so events are exactly the data blocks, with no ``event:`` name,
and each is dispatched by the second LF after it. (An unterminated tail never dispatches.) The
chunk summaries (``dialects.ChunkSummary``) change their state only through the top-level keys
``error``, ``usage`` and ``model`` and a choice's ``finish_reason``, when their value is not null
(or empty); through ``[DONE]``; and tell output by a choice's delta ``content``, ``refusal``,
``tool_calls``, ``function_call``, ``audio`` (chat) or ``text`` (completions). A JSON key written
plainly appears in the bytes as ``key"`` followed, when its value is null, by ``:null``; written
with escapes, it holds ``\\u005``, ``\\u006`` or ``\\u007`` (its characters are ``a-z`` and ``_``).
``[DONE]`` and every other payload not starting with ``{`` is parsed. An event with none of these
is a no-op for the summary once its first output and model are known, so it is only counted.
"""

from __future__ import annotations

import heapq
import re
import time
from collections.abc import Iterable, Iterator, Sequence

from r4u_mitm.pure import dialects
from r4u_mitm.pure.sse import Event

WINDOW = 256 * 1024  # bytes framed and searched per step: well under a millisecond of GIL each
_WALK = 16  # events given one by one before searching for the first output and the model

_ALWAYS = tuple(re.compile(p) for p in (
    rb'error"(?!: ?null)', rb'usage"(?!: ?null)', rb'finish_reason"(?!: ?null)', rb"\\u00[5-7]",
))
_MODEL = re.compile(rb'model"(?!: ?null|: ?"")')
_OUTPUT = {
    dialects.CHAT: tuple(re.compile(p) for p in (
        rb'"content"(?!: ?null|: ?"")', rb'refusal"(?!: ?null|: ?"")', rb'tool_calls"(?!: ?null)',
        rb'function_call"(?!: ?null)', rb'audio"(?!: ?null)',
    )),
    dialects.COMPLETIONS: (re.compile(rb'"text"(?!: ?null|: ?"")'),),
}
_IDENTITY = ("", "identity", "none")


def applies(provider: str, path: str, content_encoding: str | None) -> bool:
    """Worth trying: a chat or completions stream without a content coding."""
    return (dialects.dialect_for(provider, path) in _OUTPUT
            and (content_encoding or "").strip().lower() in _IDENTITY)


def read_stream(
    provider: str, path: str, content_encoding: str | None, body: bytes, limit: int,
    piece_ends: Iterable[int], piece_times: Sequence[float] | None,
) -> tuple[dialects.StreamSummary, float | None] | None:
    """(summary, arrival of the first output event) for the stream ``body``, as the full reading
    of its first ``limit`` bytes gives them; None when the fast reading does not apply.

    ``piece_ends``: where each teed piece ended in ``body`` (cumulative, ascending; may be lazy);
    ``piece_times``: when each arrived, or None when unknown."""
    if not applies(provider, path, content_encoding):
        return None
    size = min(len(body), limit)
    last = body.rfind(b"\n\n", 0, size)  # what follows the last blank line dispatches nothing
    framed = last + 2 if last >= 0 else 0
    if body.find(b"\r", framed, size) >= 0:  # a CR in the tail could still end lines there
        return None
    summary = dialects.stream_summary(provider, path)
    plain = _plain_prefix(body, framed)
    events = 0
    first_output = None  # offset of the LF that dispatched the first output event
    pos = 0
    while pos < framed:
        end = body.find(b"\n\n", min(pos + WINDOW, framed - 2)) + 2
        found = _frame(body, pos, end, plain)
        if found is None:
            return None
        count, unusual = found
        events += count
        first_output = _feed(summary, body, pos, end, unusual, first_output, _WALK if pos == 0 else 0)
        pos = end
        if pos < framed:  # between windows only: a sleep(0) costs ~60 µs of timer slack on Linux
            time.sleep(0)  # let other threads (the deliverer's event loop) have the GIL
    summary.events = events
    if first_output is None or piece_times is None:
        return summary, None
    index = next((i for i, piece_end in enumerate(piece_ends) if piece_end > first_output), None)
    return summary, None if index is None else piece_times[index]


def _plain_prefix(body: bytes, framed: int) -> bytes:
    """How this server starts a JSON event: ``data: {`` or ``data:{``."""
    first = 0 if body.startswith(b"data:") else body.find(b"\n\ndata:", 0, framed) + 2
    return b"data:{" if body.startswith(b"data:{", first) else b"data: {"


_UNUSUAL = {p: re.compile(b"\n\n(?!" + re.escape(p) + b")") for p in (b"data: {", b"data:{")}


def _frame(body: bytes, start: int, end: int, plain: bytes) -> tuple[int, list[int]] | None:
    """(events, starts of the blocks not beginning with ``plain``) in ``body[start:end]``, which
    begins a block and ends with a blank line; None unless it is all one-line blocks without CR.

    Lines alternate block, blank exactly when the LFs number twice the blocks counted by their
    starts (each start accounts for two distinct lines: the blank before it, and itself)."""
    if body.find(b"\r", start, end) >= 0:
        return None
    lines = body.count(b"\n", start, end)
    if body.startswith(plain, start) and lines == 2 * (body.count(b"\n\n" + plain, start, end) + 1):
        return lines // 2, []
    data = body.count(b"\n\ndata:", start, end)
    comments = body.count(b"\n\n:", start, end)
    first_data = body.startswith(b"data:", start)
    if not (first_data or body.startswith(b":", start)) or lines != 2 * (data + comments + 1):
        return None
    unusual = [] if body.startswith(plain, start) else [start]
    unusual += [m.end() for m in _UNUSUAL[plain].finditer(body, start, end - 2)]
    return data + first_data, unusual


def _feed(summary: dialects.StreamSummary, body: bytes, start: int, end: int, unusual: list[int],
          first_output: int | None, walk: int) -> int | None:
    """Give ``summary``, in order, each event of ``body[start:end]`` that a needle points into
    or that does not begin like JSON, after the first ``walk`` events, given one by one (the
    first output and the model are nearly always among the first few); returns the offset that
    dispatched the first output event."""
    pos = start  # events before this were given or are no-ops
    while walk and pos < end and (first_output is None or summary.model is None):
        stop = body.find(b"\n\n", pos)
        first_output = _give(summary, body, pos, stop, first_output)
        pos, walk = stop + 2, walk - 1
    while True:
        wanted = first_output is None, summary.model is None
        needles = [*_ALWAYS, *(_OUTPUT[summary.dialect] if wanted[0] else ()),
                   *((_MODEL,) if wanted[1] else ())]
        hits = heapq.merge(*[_starts(rx, body, pos, end) for rx in needles],
                           [at for at in unusual if at >= pos])
        for at in hits:
            if at < pos:
                continue  # in an event already given
            block = body.rfind(b"\n\n", start, at)
            stop = body.find(b"\n\n", at)
            first_output = _give(summary, body, start if block < 0 else block + 2, stop, first_output)
            pos = stop + 2
            if (first_output is None, summary.model is None) != wanted:
                break  # fewer needles matter from here on
        else:
            return first_output


def _give(summary: dialects.StreamSummary, body: bytes, block: int, stop: int, first_output: int | None):
    """Give ``summary`` the event of the block ``body[block:stop]``, if it is not a comment."""
    if body.startswith(b"data:", block):
        value = body[block + 5:stop]
        if value.startswith(b" "):
            value = value[1:]
        if summary.add(Event(data=value.decode("utf-8", "replace"))) and first_output is None:
            return stop + 1
    return first_output


def _starts(rx: re.Pattern, body: bytes, start: int, end: int) -> Iterator[int]:
    return (m.start() for m in rx.finditer(body, start, end))
