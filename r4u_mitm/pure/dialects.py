"""The four dialects of LLM APIs, and what their answers say.

Pure: no I/O, no mitmproxy, no clock. Record building reads every traced answer through this
module; ``assembly.py`` builds on its summaries for people to read.

* ``dialect_for``: which dialect a request speaks, from its path (and provider).
* Stream semantics (``stream_summary``): an event stream, fed one event at a time, tells whether it
  ended properly, what went wrong, the model, the finish reason, the usage, and which event carried
  the first output (for time to first token).
* Non-streamed answers (``body_summary``): the same facts from a JSON body.

=============  ======================================  ========================================
dialect        path                                    stream
=============  ======================================  ========================================
responses      contains ``/responses``                 ``event:`` + JSON ``type``, no [DONE]
anthropic      provider anthropic / ends ``/messages`` ``event:`` + JSON ``type``, no [DONE]
completions    ends ``/completions``, not chat         data-only chunks, ``[DONE]``
chat           everything else (also Azure)            data-only chunks, ``[DONE]``
=============  ======================================  ========================================

Everything here trusts nothing: a payload may be invalid JSON or JSON of any shape. Such events are
counted and otherwise ignored; ``StreamSummary.add`` never raises.
"""

from __future__ import annotations

import json
from typing import Any

from r4u_mitm.pure.hosts import ANTHROPIC
from r4u_mitm.pure.sse import Event

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "MESSAGES",
    "RESPONSES",
    "RESPONSE_LIFECYCLE",
    "AnthropicSummary",
    "ChatSummary",
    "ChunkSummary",
    "CompletionsSummary",
    "ResponsesSummary",
    "StreamSummary",
    "body_summary",
    "dialect_for",
    "nonempty_str",
    "parse_json",
    "stream_summary",
]

CHAT = "chat"
COMPLETIONS = "completions"
RESPONSES = "responses"
MESSAGES = "anthropic"

_MAX_ERROR = 500  # characters of a provider's error text kept in a summary

_loads = json.loads
_JSON_ERRORS = (ValueError, RecursionError)  # JSONDecodeError is a ValueError; "[[[[…" recurses


# ---------------------------------------------------------------------------------------------
# Dialects and small helpers


def dialect_for(provider: str, path: str) -> str:
    """``chat``, ``completions``, ``responses`` or ``anthropic`` for a request path."""
    p = (path or "").partition("?")[0].partition("#")[0].rstrip("/").lower()
    if "/responses" in p:
        return RESPONSES
    if provider == ANTHROPIC or p.endswith("/messages"):
        return MESSAGES
    if p.endswith("/completions") and not p.endswith("/chat/completions"):
        return COMPLETIONS
    return CHAT


def _short(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (ValueError, TypeError, RecursionError):
            text = "?"
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 1] + "…"


def _error_text(err: Any) -> str:
    """``"<type or code>: <message>"`` from an error object, with whatever fields exist."""
    if isinstance(err, str):
        return _short(err) if err else "error"
    if not isinstance(err, dict):
        return "error"
    kind: Any = err.get("type")
    if not isinstance(kind, str) or not kind or kind == "error":  # the flat Responses shape
        kind = err.get("code")
    if isinstance(kind, bool) or not isinstance(kind, (str, int)) or kind == "":
        kind = None
    message = err.get("message")
    if message is not None and message != "":
        text = _short(message)
        return f"{kind}: {text}" if kind is not None else text
    return str(kind) if kind is not None else "error"


def nonempty_str(value: Any) -> str | None:
    """The value when it is a non-empty string, else None."""
    return value if value.__class__ is str and value else None


def parse_json(text: str) -> tuple[bool, Any]:
    """``(True, value)``, or ``(False, None)`` when the text is not JSON (or nests too deep)."""
    try:
        return True, _loads(text)
    except _JSON_ERRORS:
        return False, None


def _merge_usage(into: dict | None, update: Any) -> dict | None:
    if update.__class__ is not dict:
        return into
    merged = dict(into) if into else {}
    for key, value in update.items():
        if value is not None:
            merged[key] = value
    return merged


# ---------------------------------------------------------------------------------------------
# Stream summaries


class StreamSummary:
    """What an event stream said, event by event. Build one with ``stream_summary``.

    ``add(event)`` returns True when the event carries output (the first such event gives the time
    to first token). Attributes: ``events`` (added so far), ``complete`` (the provider's terminal
    event was seen: ``[DONE]``, ``response.completed``/``incomplete``/``failed``, ``message_stop``,
    or an error event/payload), ``error`` (what the provider said went wrong), ``model``,
    ``finish_reason``, ``usage``, and ``id`` (the completion/response/message id, when sent).
    """

    __slots__ = ("dialect", "events", "complete", "error", "model", "finish_reason", "usage", "id")

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self.events = 0
        self.complete = False
        self.error: str | None = None
        self.model: str | None = None
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.id: str | None = None

    def add(self, event: Event) -> bool:
        self.events += 1
        try:
            return self._add(event)
        except Exception:  # belt and braces: a tracer must never fail on what a server sends
            return False

    def _add(self, event: Event) -> bool:  # pragma: no cover - overridden
        return False

    def _fail(self, err: Any) -> None:
        self.complete = True
        self.error = _error_text(err)

    def as_dict(self) -> dict:
        """The summary as plain data."""
        return {
            "complete": self.complete,
            "error": self.error,
            "model": self.model,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "events": self.events,
        }

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"<{type(self).__name__} {self.dialect} {fields}>"


class ChunkSummary(StreamSummary):
    """Chat Completions and legacy Completions: data-only chunks, ``data: [DONE]`` at the end.

    fastpath.py reads these streams by skipping the events that name none of the keys read here
    (its needles ``_ALWAYS``, ``_MODEL``, ``_OUTPUT``): keep them in step; tests/test_fastpath.py
    compares the two readings."""

    __slots__ = ("_fr_index0",)

    def __init__(self, dialect: str) -> None:
        super().__init__(dialect)
        self._fr_index0 = False  # finish_reason came from choice index 0

    def _add(self, event: Event) -> bool:
        data = event.data
        if data.startswith("[DONE]"):
            self.complete = True
            return False
        try:
            d = _loads(data)
        except _JSON_ERRORS:
            return False
        if d.__class__ is not dict:
            return False
        err = d.get("error")
        if err:
            self._fail(err)
            return False
        if event.event == "error":  # not OpenAI's way, but some compatible servers do this
            self._fail(d)
            return False
        if d.get("object") == "":  # Azure prompt-filter / async-filter annotation frame
            return False
        if self.model is None:
            m = d.get("model")
            if m and m.__class__ is str:
                self.model = m
                ident = d.get("id")
                if ident and ident.__class__ is str:
                    self.id = ident
        u = d.get("usage")
        if u is not None and u.__class__ is dict:
            self.usage = u
        choices = d.get("choices")
        if not choices or choices.__class__ is not list:
            return False
        return self._choices(choices)

    def _finish(self, choice: dict, reason: str) -> None:
        if choice.get("index") == 0:
            self.finish_reason = reason
            self._fr_index0 = True
        elif not self._fr_index0 and self.finish_reason is None:
            self.finish_reason = reason

    def _choices(self, choices: list) -> bool:
        """Note each choice's finish reason; True when any choice carries output."""
        out = False
        for c in choices:
            if c.__class__ is not dict:
                continue
            fr = c.get("finish_reason")
            if fr and fr.__class__ is str:
                self._finish(c, fr)
            if self._carries_output(c):
                out = True
        return out

    def _carries_output(self, choice: dict) -> bool:  # pragma: no cover - overridden
        return False


class ChatSummary(ChunkSummary):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(CHAT)

    def _carries_output(self, choice: dict) -> bool:
        delta = choice.get("delta")
        return bool(delta) and delta.__class__ is dict and bool(
            delta.get("content")
            or delta.get("refusal")
            or delta.get("tool_calls")
            or delta.get("function_call")
            or _audio_output(delta.get("audio"))
        )


def _audio_output(audio: Any) -> bool:
    return audio.__class__ is dict and bool(audio.get("data") or audio.get("transcript"))


class CompletionsSummary(ChunkSummary):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(COMPLETIONS)

    def _carries_output(self, choice: dict) -> bool:
        return bool(choice.get("text"))


_RESPONSE_OUTPUT = frozenset(
    (
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
    )
)
RESPONSE_LIFECYCLE = frozenset(
    (
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.completed",
        "response.incomplete",
        "response.failed",
    )
)


class _TypedSummary(StreamSummary):
    """Responses and Anthropic: each payload names its event in a JSON ``type`` (the SSE event
    name is the fallback)."""

    __slots__ = ()

    def _add(self, event: Event) -> bool:
        try:
            d = _loads(event.data)
        except _JSON_ERRORS:
            return False
        if d.__class__ is not dict:
            return False
        t = d.get("type")
        if t.__class__ is not str:
            t = event.event
        return self._on(t, d)

    def _on(self, t: str, d: dict) -> bool:  # pragma: no cover - overridden
        return False

    def _identify(self, obj: dict) -> None:
        """Take the model and id a response or message object names (each kept when it names none)."""
        m = nonempty_str(obj.get("model"))
        if m:
            self.model = m
        ident = nonempty_str(obj.get("id"))
        if ident:
            self.id = ident


class ResponsesSummary(_TypedSummary):
    """Responses API: ``event: <type>`` + JSON with the same ``type``; ends with a terminal event."""

    __slots__ = ("status",)

    def __init__(self) -> None:
        super().__init__(RESPONSES)
        self.status: str | None = None

    def _on(self, t: str, d: dict) -> bool:
        if t in _RESPONSE_OUTPUT:
            delta = d.get("delta")
            return bool(delta) and delta.__class__ is str
        if t in RESPONSE_LIFECYCLE:
            self._lifecycle(t, d)
        elif t == "error" or d.get("error"):
            err = d.get("error")
            self._fail(err if err else d)
        return False

    def _lifecycle(self, t: str, d: dict) -> None:
        r = d.get("response")
        r = r if r.__class__ is dict else {}
        self._identify(r)
        u = r.get("usage")
        if u.__class__ is dict:
            self.usage = u
        status = nonempty_str(r.get("status"))
        if status:
            self.status = status
        if t == "response.completed":
            self.complete = True
            self.finish_reason = status or "completed"
        elif t == "response.incomplete":
            self.complete = True
            details = r.get("incomplete_details")
            reason = nonempty_str(details.get("reason")) if details.__class__ is dict else None
            self.finish_reason = reason or status or "incomplete"
        elif t == "response.failed":
            self.finish_reason = status or "failed"
            err = r.get("error")
            self._fail(err if err else "response failed")


class AnthropicSummary(_TypedSummary):
    """Anthropic Messages: ``event: <type>`` + JSON with the same ``type``; ends with message_stop."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(MESSAGES)

    def _on(self, t: str, d: dict) -> bool:
        if t == "content_block_delta":
            delta = d.get("delta")
            if delta.__class__ is not dict:
                return False
            kind = delta.get("type")
            if kind == "text_delta":
                text = delta.get("text")
            elif kind == "input_json_delta":
                text = delta.get("partial_json")
            else:
                return False
            return bool(text) and text.__class__ is str
        if t == "content_block_start":
            block = d.get("content_block")
            return block.__class__ is dict and block.get("type") == "tool_use"
        if t == "message_start":
            msg = d.get("message")
            if msg.__class__ is dict:
                self._identify(msg)
                self.usage = _merge_usage(self.usage, msg.get("usage"))
        elif t == "message_delta":
            delta = d.get("delta")
            if delta.__class__ is dict:
                reason = nonempty_str(delta.get("stop_reason"))
                if reason:
                    self.finish_reason = reason
            self.usage = _merge_usage(self.usage, d.get("usage"))
        elif t == "message_stop":
            self.complete = True
        elif t == "error":
            err = d.get("error")
            self._fail(err if err else d)
        return False


_SUMMARIES: dict[str, type[StreamSummary]] = {
    CHAT: ChatSummary,
    COMPLETIONS: CompletionsSummary,
    RESPONSES: ResponsesSummary,
    MESSAGES: AnthropicSummary,
}


def stream_summary(provider: str, path: str) -> StreamSummary:
    """A fresh summary for a stream answering ``path`` at ``provider``."""
    return _SUMMARIES[dialect_for(provider, path)]()


# ---------------------------------------------------------------------------------------------
# Non-streamed answers


def body_summary(provider: str, path: str, body: str) -> dict:
    """``model``, ``finish_reason``, ``usage``, ``error`` of a JSON answer (all None if not JSON).

    Works from the body's shape: chat.completion / text_completion (``choices``), Responses
    (``object: response``), Anthropic (``type: message``), embeddings (model, usage), error
    bodies (``{"error": …}``), anything else (None).
    """
    out: dict[str, Any] = {"model": None, "finish_reason": None, "usage": None, "error": None}
    if body.__class__ is not str:
        return out
    ok, d = parse_json(body)
    if not ok or d.__class__ is not dict:
        return out
    err = d.get("error")
    if err:
        out["error"] = _error_text(err)
    out["model"] = nonempty_str(d.get("model"))
    u = d.get("usage")
    if u.__class__ is dict:
        out["usage"] = u
    choices = d.get("choices")
    if choices.__class__ is list:
        first = None
        for c in choices:
            if c.__class__ is not dict:
                continue
            fr = nonempty_str(c.get("finish_reason"))
            if fr and c.get("index") == 0:
                first = fr
                break
            if fr and first is None:
                first = fr
        out["finish_reason"] = first
    elif d.get("object") == "response":
        status = nonempty_str(d.get("status"))
        if status == "incomplete":
            details = d.get("incomplete_details")
            reason = nonempty_str(details.get("reason")) if details.__class__ is dict else None
            out["finish_reason"] = reason or status
        else:
            out["finish_reason"] = status
    elif d.get("type") == "message":
        out["finish_reason"] = nonempty_str(d.get("stop_reason"))
    return out
