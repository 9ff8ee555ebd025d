"""Server-sent events: bytes in, events out (WHATWG HTML §9.2.6). Pure: no I/O, no mitmproxy.

Spec: https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation

Two layers, as in the spec: a line splitter (UTF-8 decode, BOM, CR/LF/CRLF) and a field parser
(one flat ``if/elif`` over field names). Work per ``feed()`` is proportional to the piece: a
partial line is kept as a list of fragments and joined once, when its line ending arrives.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched server-sent event."""

    event: str = "message"
    data: str = ""
    id: str = ""
    retry: int | None = None


# Only CR and LF end lines (CRLF counts once). Not str.splitlines: it also splits on \x0b, \x1c,
# \x85, \u2028, ... which are ordinary characters in an event stream.
_EOL = re.compile("\r\n|\r|\n")


class SSEDecoder:
    """Incremental event-stream parser. ``feed`` accepts any split of the bytes: inside a line,
    inside a UTF-8 sequence, inside the BOM, or between the CR and LF of one line ending."""

    def __init__(self) -> None:
        # Line splitter state.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # invalid -> U+FFFD
        self._bom_checked = False  # one leading U+FEFF is stripped, once, from the first text
        self._cr = False  # the last text ended in CR: an LF starting the next text is its pair
        self._parts: list[str] = []  # fragments of the current unterminated line
        # Field parser state ("buffers" in the spec).
        self._data: list[str] = []  # one entry per data line; joined with "\n" on dispatch
        self._event = ""
        self._id = ""  # last event ID buffer: persists across events
        self._retry: int | None = None  # this event's valid retry field, if any
        self._dirty = False  # a field line was seen since the last blank line
        self.pending = False  # set by finish(): an unterminated event/partial line was discarded

    def feed(self, piece: bytes) -> list[Event]:
        """Decode one piece; return the events completed by it."""
        events = []
        for line in self._lines(self._utf8.decode(piece)):
            event = self._field(line)
            if event is not None:
                events.append(event)
        return events

    def finish(self) -> list[Event]:
        """End of stream. An event not closed by a blank line is discarded (spec: "Once the end of
        the file is reached, any pending data must be discarded"), so this never returns events;
        ``pending`` records whether anything was dropped."""
        tail = self._utf8.decode(b"", final=True)  # an incomplete UTF-8 sequence -> U+FFFD
        self.pending = bool(self._parts or tail or self._dirty)
        self._parts = []
        self._data = []
        self._event = ""
        self._retry = None
        self._dirty = False
        return []

    # -- line splitter -------------------------------------------------------------------------

    def _lines(self, text: str) -> list[str]:
        """Complete lines in ``text`` (without their endings); keeps the unterminated rest."""
        if not text:
            return []
        if not self._bom_checked:
            # The incremental decoder holds back a partial BOM, so the first non-empty text
            # starts with the whole U+FEFF if the stream does.
            self._bom_checked = True
            if text[0] == "\ufeff":
                text = text[1:]
                if not text:
                    return []
        if self._cr:
            self._cr = False
            if text[0] == "\n":  # second half of a CRLF split across pieces
                text = text[1:]
                if not text:
                    return []
        self._cr = text[-1] == "\r"
        lines = _EOL.split(text) if "\r" in text else text.split("\n")
        if len(lines) == 1:
            self._parts.append(text)
            return []
        if self._parts:
            self._parts.append(lines[0])
            lines[0] = "".join(self._parts)
            self._parts = []
        tail = lines.pop()
        if tail:
            self._parts.append(tail)
        return lines

    # -- field parser (spec: "process the field", "dispatch the event") ---------------------------

    def _field(self, line: str) -> Event | None:
        """Apply one line; return an Event when a blank line dispatches a non-empty data buffer."""
        if not line:
            return self._dispatch()
        if line[0] == ":":  # comment / keep-alive
            return None
        self._dirty = True
        name, colon, value = line.partition(":")  # no colon: the whole line is the name, value ""
        if colon and value[:1] == " ":
            value = value[1:]  # exactly one leading space
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value  # empty value resets it
        elif name == "retry":
            if value.isascii() and value.isdigit():  # isdigit alone accepts e.g. "²", "٣"
                self._retry = int(value)
        # other field names are ignored
        return None

    def _dispatch(self) -> Event | None:
        data, self._data = self._data, []
        event, self._event = self._event, ""
        retry, self._retry = self._retry, None
        self._dirty = False
        if not data:  # empty data buffer: reset, dispatch nothing
            return None
        return Event(event or "message", "\n".join(data), self._id, retry)
