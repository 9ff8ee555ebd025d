"""Which hosts are LLM APIs, and what their answers say.

Pure: no I/O, no mitmproxy, no clock.

* Host rules (``parse_host_rules``): ``host``, ``host=provider``, ``*.suffix``, ``host:port``.
* Stream semantics (``stream_summary``): an event stream, fed one event at a time, tells whether it
  ended properly, what went wrong, the model, the finish reason, the usage, and which event carried
  the first output (for time to first token).
* Non-streamed answers (``body_summary``): the same facts from a JSON body.
* ``assemble``: a stream's result put back together for people to read.

Four dialects, chosen from the request path (and the provider):

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

import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from r4u_mitm.sse import Event

__all__ = [
    "ANTHROPIC",
    "AZURE_OPENAI",
    "DEFAULT_HOSTS",
    "OPENAI",
    "OPENAI_COMPATIBLE",
    "PROVIDERS",
    "HostRule",
    "HostRules",
    "StreamSummary",
    "assemble",
    "body_summary",
    "dialect_for",
    "parse_host_rules",
    "stream_summary",
]

OPENAI = "openai"
AZURE_OPENAI = "azure_openai"
ANTHROPIC = "anthropic"
OPENAI_COMPATIBLE = "openai_compatible"
PROVIDERS = (OPENAI, AZURE_OPENAI, ANTHROPIC, OPENAI_COMPATIBLE)

DEFAULT_HOSTS = ("api.openai.com", "*.openai.azure.com")

CHAT = "chat"
COMPLETIONS = "completions"
RESPONSES = "responses"
MESSAGES = "anthropic"

_MAX_ERROR = 500  # characters of a provider's error text kept in a summary

_loads = json.loads
_JSON_ERRORS = (ValueError, RecursionError)  # JSONDecodeError is a ValueError; "[[[[…" recurses


# ---------------------------------------------------------------------------------------------
# Host rules


@dataclass(frozen=True, slots=True)
class HostRule:
    """One parsed entry. ``host`` is lower-case ASCII (IDNA); a wildcard rule keeps ``*.`` in front."""

    host: str
    port: int | None
    provider: str
    entry: str  # as written, for messages

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port is None else f":{self.port}"
        return f"{host}{port}={self.provider}"


_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def _normalize_name(name: str) -> str | None:
    """Lower-case ASCII host name or IP address, or None when it is not one."""
    name = name.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        return None
    if ":" in name:
        try:
            return ipaddress.IPv6Address(name).compressed
        except ValueError:
            return None
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(name) > 253:
        return None
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            return None
    return name


def _infer_provider(host: str) -> str:
    if host == "api.openai.com":
        return OPENAI
    if host == "api.anthropic.com":
        return ANTHROPIC
    bare = host[2:] if host.startswith("*.") else host
    if bare.endswith(".openai.azure.com") or (host.startswith("*.") and bare == "openai.azure.com"):
        return AZURE_OPENAI
    return OPENAI_COMPATIBLE


def _parse_entry(entry: object) -> HostRule:
    if not isinstance(entry, str):
        raise ValueError(f"host rule {entry!r}: not a string")
    text = entry.strip()
    if not text:
        raise ValueError("empty host rule (expected host, host:port or host=provider)")

    spec, eq, provider = text.partition("=")
    spec = spec.strip()
    provider = provider.strip().lower()
    if eq and provider not in PROVIDERS:
        what = "missing provider" if not provider else f"unknown provider {provider!r}"
        raise ValueError(f"host rule {entry!r}: {what}; expected one of {', '.join(PROVIDERS)}")

    # host, [v6], [v6]:port, host:port, bare v6
    port_text = None
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0:
            raise ValueError(f"host rule {entry!r}: unclosed '[' in an IPv6 address")
        host_text, rest = spec[1:close], spec[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"host rule {entry!r}: unexpected {rest!r} after ']'")
            port_text = rest[1:]
    elif spec.count(":") == 1:
        host_text, _, port_text = spec.partition(":")
    else:
        host_text = spec  # no port, or a bare IPv6 address (no port possible without brackets)

    port = None
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise ValueError(f"host rule {entry!r}: bad port {port_text!r} (expected 1-65535)")
        port = int(port_text)

    wildcard = host_text.startswith("*.")
    name = host_text[2:] if wildcard else host_text
    if "*" in name:
        raise ValueError(
            f"host rule {entry!r}: bad wildcard; only a leading '*.' is allowed (e.g. *.openai.azure.com)"
        )
    host = _normalize_name(name)
    if host is None or (wildcard and ":" in host):
        raise ValueError(f"host rule {entry!r}: {host_text!r} is not a host name or IP address")
    if wildcard:
        host = "*." + host
    return HostRule(host, port, provider or _infer_provider(host), entry)


class HostRules:
    """Parsed host rules; ``match`` answers which provider (if any) a host:port belongs to.

    Precedence: an exact host beats a wildcard, a longer wildcard beats a shorter one, and within
    the same host a rule with the port beats one without.
    """

    __slots__ = ("rules", "_exact", "_wild")

    def __init__(self, rules: Iterable[HostRule] = ()) -> None:
        self.rules: tuple[HostRule, ...] = ()
        self._exact: dict[str, dict[int | None, str]] = {}
        self._wild: list[tuple[str, dict[int | None, str]]] = []  # (".suffix", ports), longest first
        seen: dict[tuple[str, int | None], HostRule] = {}
        kept: list[HostRule] = []
        for rule in rules:
            key = (rule.host, rule.port)
            other = seen.get(key)
            if other is not None:
                if other.provider != rule.provider:
                    raise ValueError(
                        f"host rule {rule.entry!r} conflicts with {other.entry!r} "
                        f"({rule.provider} vs {other.provider})"
                    )
                continue
            seen[key] = rule
            kept.append(rule)
            if rule.host.startswith("*."):
                suffix = rule.host[1:]
                for s, ports in self._wild:
                    if s == suffix:
                        break
                else:
                    ports = {}
                    self._wild.append((suffix, ports))
                ports[rule.port] = rule.provider
            else:
                self._exact.setdefault(rule.host, {})[rule.port] = rule.provider
        self._wild.sort(key=lambda item: -len(item[0]))
        self.rules = tuple(kept)

    def match(self, host: str, port: int | None = None) -> str | None:
        """The provider for ``host`` (any case, optional trailing dot or [v6] brackets), or None."""
        if not host:
            return None
        h = host.lower()
        if h[-1] == ".":
            h = h[:-1]
        if h[:1] == "[" and h[-1:] == "]":
            h = h[1:-1]
        if ":" in h:
            try:
                h = ipaddress.IPv6Address(h).compressed
            except ValueError:
                return None
        elif not h.isascii():  # an IDN shown in Unicode; rules hold the ASCII (punycode) form
            try:
                h = h.encode("idna").decode("ascii")
            except UnicodeError:
                return None
        ports = self._exact.get(h)
        if ports is not None:
            found = ports.get(port) if port is not None else None
            if found is None:
                found = ports.get(None)
            if found is not None:
                return found
        for suffix, ports in self._wild:
            if h.endswith(suffix):
                found = ports.get(port) if port is not None else None
                if found is None:
                    found = ports.get(None)
                if found is not None:
                    return found
        return None

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"HostRules({', '.join(str(r) for r in self.rules)})"


def parse_host_rules(entries: Sequence[str]) -> HostRules:
    """Parse ``host``, ``host:port``, ``*.suffix`` and ``…=provider`` entries.

    A missing provider is inferred from the host (api.openai.com, *.openai.azure.com,
    api.anthropic.com; anything else is openai_compatible). Raises ValueError naming the entry.
    """
    if isinstance(entries, str):  # a lone string would otherwise be parsed letter by letter
        entries = [entries]
    return HostRules([_parse_entry(e) for e in entries])


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


def _str(value: Any) -> str | None:
    """The value when it is a non-empty string, else None."""
    return value if value.__class__ is str and value else None


def _idx(value: Any) -> int | None:
    return value if value.__class__ is int else None


def _parse_json(text: str) -> tuple[bool, Any]:
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


class _ChunkSummary(StreamSummary):
    """Chat Completions and legacy Completions: data-only chunks, ``data: [DONE]`` at the end.

    fastpath.py skips the events that name none of the keys read here: keep its needles in step."""

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


class _ChatSummary(_ChunkSummary):
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


class _CompletionsSummary(_ChunkSummary):
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
_RESPONSE_LIFECYCLE = frozenset(
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


class _ResponsesSummary(_TypedSummary):
    """Responses API: ``event: <type>`` + JSON with the same ``type``; ends with a terminal event."""

    __slots__ = ("status",)

    def __init__(self) -> None:
        super().__init__(RESPONSES)
        self.status: str | None = None

    def _on(self, t: str, d: dict) -> bool:
        if t in _RESPONSE_OUTPUT:
            delta = d.get("delta")
            return bool(delta) and delta.__class__ is str
        if t in _RESPONSE_LIFECYCLE:
            self._lifecycle(t, d)
        elif t == "error" or d.get("error"):
            err = d.get("error")
            self._fail(err if err else d)
        return False

    def _lifecycle(self, t: str, d: dict) -> None:
        r = d.get("response")
        r = r if r.__class__ is dict else {}
        m = _str(r.get("model"))
        if m:
            self.model = m
        ident = _str(r.get("id"))
        if ident:
            self.id = ident
        u = r.get("usage")
        if u.__class__ is dict:
            self.usage = u
        status = _str(r.get("status"))
        if status:
            self.status = status
        if t == "response.completed":
            self.complete = True
            self.finish_reason = status or "completed"
        elif t == "response.incomplete":
            self.complete = True
            details = r.get("incomplete_details")
            reason = _str(details.get("reason")) if details.__class__ is dict else None
            self.finish_reason = reason or status or "incomplete"
        elif t == "response.failed":
            self.finish_reason = status or "failed"
            err = r.get("error")
            self._fail(err if err else "response failed")


class _AnthropicSummary(_TypedSummary):
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
                m = _str(msg.get("model"))
                if m:
                    self.model = m
                ident = _str(msg.get("id"))
                if ident:
                    self.id = ident
                self.usage = _merge_usage(self.usage, msg.get("usage"))
        elif t == "message_delta":
            delta = d.get("delta")
            if delta.__class__ is dict:
                reason = _str(delta.get("stop_reason"))
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
    CHAT: _ChatSummary,
    COMPLETIONS: _CompletionsSummary,
    RESPONSES: _ResponsesSummary,
    MESSAGES: _AnthropicSummary,
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
    ok, d = _parse_json(body)
    if not ok or d.__class__ is not dict:
        return out
    err = d.get("error")
    if err:
        out["error"] = _error_text(err)
    out["model"] = _str(d.get("model"))
    u = d.get("usage")
    if u.__class__ is dict:
        out["usage"] = u
    choices = d.get("choices")
    if choices.__class__ is list:
        first = None
        for c in choices:
            if c.__class__ is not dict:
                continue
            fr = _str(c.get("finish_reason"))
            if fr and c.get("index") == 0:
                first = fr
                break
            if fr and first is None:
                first = fr
        out["finish_reason"] = first
    elif d.get("object") == "response":
        status = _str(d.get("status"))
        if status == "incomplete":
            details = d.get("incomplete_details")
            reason = _str(details.get("reason")) if details.__class__ is dict else None
            out["finish_reason"] = reason or status
        else:
            out["finish_reason"] = status
    elif d.get("type") == "message":
        out["finish_reason"] = _str(d.get("stop_reason"))
    return out


# ---------------------------------------------------------------------------------------------
# Assembly: the same per-dialect summaries, plus accumulation of the content


def _parsed_arguments(entry: dict, text: str) -> None:
    """Add ``parsed_arguments`` when the arguments are valid JSON."""
    ok, value = _parse_json(text)
    if ok:
        entry["parsed_arguments"] = value


class _ChatChoice:
    __slots__ = ("index", "role", "content", "refusal", "reasoning", "tool_calls", "function_call", "finish_reason")

    def __init__(self, index: int) -> None:
        self.index = index
        self.role: str | None = None
        self.content: list[str] | None = None  # None until the server sends a string
        self.refusal: list[str] | None = None
        self.reasoning: list[str] | None = None  # reasoning_content / reasoning (compatible servers)
        self.tool_calls: dict[int, _ToolCall] = {}
        self.function_call: _ToolCall | None = None
        self.finish_reason: str | None = None

    def result(self) -> dict:
        out: dict[str, Any] = {
            "index": self.index,
            "role": self.role,
            "content": None if self.content is None else "".join(self.content),
            "refusal": None if self.refusal is None else "".join(self.refusal),
            "finish_reason": self.finish_reason,
        }
        if self.tool_calls:
            out["tool_calls"] = [self.tool_calls[i].result() for i in sorted(self.tool_calls)]
        if self.function_call is not None:
            out["function_call"] = self.function_call.result()
        if self.reasoning is not None:
            out["reasoning"] = "".join(self.reasoning)
        return out


class _ToolCall:
    __slots__ = ("id", "type", "name", "arguments")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.name: str | None = None
        self.arguments: list[str] = []

    def update(self, tc: dict, fn: Any) -> None:
        ident = _str(tc.get("id"))
        if ident and self.id is None:
            self.id = ident  # a repeated id is the same id, not more of it
        kind = _str(tc.get("type"))
        if kind:
            self.type = kind
        if fn.__class__ is dict:
            name = _str(fn.get("name"))
            if name and name != self.name:  # split names concatenate, repeated ones don't
                self.name = name if self.name is None else self.name + name
            args = fn.get("arguments")
            if args and args.__class__ is str:
                self.arguments.append(args)

    def result(self) -> dict:
        args = "".join(self.arguments)
        out: dict[str, Any] = {"id": self.id, "type": self.type, "name": self.name, "arguments": args}
        _parsed_arguments(out, args)
        return out


def _append(parts: list[str] | None, value: Any) -> list[str] | None:
    """Accumulate a string field: None until a string arrives (so ``content: null`` stays None)."""
    if value.__class__ is not str:
        return parts
    if parts is None:
        return [value]
    if value:
        parts.append(value)
    return parts


class _ChatAssembly(_ChatSummary):
    __slots__ = ("_choices_by_index",)

    def __init__(self) -> None:
        super().__init__()
        self._choices_by_index: dict[int, _ChatChoice] = {}

    def _choices(self, choices: list) -> bool:
        out = super()._choices(choices)
        for pos, c in enumerate(choices):
            if c.__class__ is not dict:
                continue
            delta = c.get("delta")
            if delta.__class__ is not dict:
                delta = {}  # some servers send the finish without a delta
            index = _idx(c.get("index"))
            if index is None:
                index = pos
            ch = self._choices_by_index.get(index)
            if ch is None:
                ch = self._choices_by_index[index] = _ChatChoice(index)
            role = _str(delta.get("role"))
            if role:
                ch.role = role
            ch.content = _append(ch.content, delta.get("content"))
            ch.refusal = _append(ch.refusal, delta.get("refusal"))
            reasoning = delta.get("reasoning_content")
            if reasoning is None:
                reasoning = delta.get("reasoning")
            ch.reasoning = _append(ch.reasoning, reasoning)
            tool_calls = delta.get("tool_calls")
            if tool_calls.__class__ is list:
                for tc in tool_calls:
                    if tc.__class__ is dict:
                        self._tool_call(ch, tc)
            fc = delta.get("function_call")
            if fc.__class__ is dict:
                if ch.function_call is None:
                    ch.function_call = _ToolCall()
                ch.function_call.update({}, fc)
            fr = _str(c.get("finish_reason"))
            if fr:
                ch.finish_reason = fr
        return out

    @staticmethod
    def _tool_call(ch: _ChatChoice, tc: dict) -> None:
        calls = ch.tool_calls
        index = _idx(tc.get("index"))
        if index is None:  # servers that omit the index: a new id starts a new call
            ident = _str(tc.get("id"))
            if ident:
                index = next((i for i, call in calls.items() if call.id == ident), None)
                if index is None:
                    index = max(calls) + 1 if calls else 0
            else:
                index = max(calls) if calls else 0
        call = calls.get(index)
        if call is None:
            call = calls[index] = _ToolCall()
        call.update(tc, tc.get("function"))

    def result(self) -> dict:
        out = {"dialect": self.dialect, "id": self.id, **self.as_dict()}
        out["choices"] = [self._choices_by_index[i].result() for i in sorted(self._choices_by_index)]
        return out


class _CompletionsAssembly(_CompletionsSummary):
    __slots__ = ("_texts", "_finish_reasons")

    def __init__(self) -> None:
        super().__init__()
        self._texts: dict[int, list[str]] = {}
        self._finish_reasons: dict[int, str] = {}

    def _choices(self, choices: list) -> bool:
        out = super()._choices(choices)
        for pos, c in enumerate(choices):
            if c.__class__ is not dict:
                continue
            index = _idx(c.get("index"))
            if index is None:
                index = pos
            parts = self._texts.setdefault(index, [])
            text = c.get("text")
            if text and text.__class__ is str:
                parts.append(text)
            fr = _str(c.get("finish_reason"))
            if fr:
                self._finish_reasons[index] = fr
        return out

    def result(self) -> dict:
        out = {"dialect": self.dialect, "id": self.id, **self.as_dict()}
        out["choices"] = [
            {"index": i, "text": "".join(self._texts[i]), "finish_reason": self._finish_reasons.get(i)}
            for i in sorted(self._texts)
        ]
        return out


class _ResponseItem:
    """One output item of a Responses stream, accumulated from its events."""

    __slots__ = ("raw", "type", "text", "refusal", "arguments", "summary", "reasoning")

    def __init__(self, kind: str | None = None) -> None:
        self.raw: dict = {}
        self.type = kind
        self.text: dict[int, list[str]] = {}  # content_index -> pieces (message output_text)
        self.refusal: dict[int, list[str]] = {}
        self.arguments: list[str] = []
        self.summary: dict[int, list[str]] = {}  # summary_index -> pieces
        self.reasoning: dict[int, list[str]] = {}  # content_index -> pieces (raw reasoning text)

    def apply(self, raw: Any) -> None:
        """Take an item snapshot (added, done, or the final response's output) as authoritative."""
        if raw.__class__ is not dict:
            return
        self.raw = raw
        kind = _str(raw.get("type"))
        if kind:
            self.type = kind
        content = raw.get("content")
        if content.__class__ is list:
            for ci, part in enumerate(content):
                if part.__class__ is dict:
                    self.part(ci, part)
        args = raw.get("arguments")
        if args.__class__ is str:
            self.arguments = [args]
        summary = raw.get("summary")
        if summary.__class__ is list:
            for si, part in enumerate(summary):
                if part.__class__ is dict and part.get("text").__class__ is str:
                    self.summary[si] = [part["text"]]

    def part(self, ci: int, part: dict) -> None:
        kind = part.get("type")
        if kind == "output_text" and part.get("text").__class__ is str:
            self.text[ci] = [part["text"]]
        elif kind == "refusal" and part.get("refusal").__class__ is str:
            self.refusal[ci] = [part["refusal"]]
        elif kind == "reasoning_text" and part.get("text").__class__ is str:
            self.reasoning[ci] = [part["text"]]

    def result(self) -> dict:
        raw = self.raw
        kind = self.type
        if kind == "message":
            out: dict[str, Any] = {
                "type": kind,
                "id": raw.get("id"),
                "role": raw.get("role"),
                "status": raw.get("status"),
                "text": "".join("".join(self.text[i]) for i in sorted(self.text)),
            }
            if self.refusal:
                out["refusal"] = "".join("".join(self.refusal[i]) for i in sorted(self.refusal))
            return out
        if kind == "function_call":
            args = "".join(self.arguments)
            out = {
                "type": kind,
                "id": raw.get("id"),
                "call_id": raw.get("call_id"),
                "name": raw.get("name"),
                "status": raw.get("status"),
                "arguments": args,
            }
            _parsed_arguments(out, args)
            return out
        if kind == "reasoning":
            out = {
                "type": kind,
                "id": raw.get("id"),
                "status": raw.get("status"),
                "summary": ["".join(self.summary[i]) for i in sorted(self.summary)],
            }
            if self.reasoning:
                out["content"] = ["".join(self.reasoning[i]) for i in sorted(self.reasoning)]
            return out
        out = dict(raw)  # other tools (web search, code interpreter, …): what the server said
        if kind is not None:
            out["type"] = kind
        return out


_ITEM_KIND = {
    "response.output_text.delta": "message",
    "response.refusal.delta": "message",
    "response.function_call_arguments.delta": "function_call",
    "response.reasoning_summary_text.delta": "reasoning",
    "response.reasoning_text.delta": "reasoning",
}


class _ResponsesAssembly(_ResponsesSummary):
    __slots__ = ("_items", "_item_ids")

    def __init__(self) -> None:
        super().__init__()
        self._items: dict[int, _ResponseItem] = {}
        self._item_ids: dict[str, int] = {}

    def _item(self, d: dict, t: str, item_id: str | None) -> _ResponseItem | None:
        index = _idx(d.get("output_index"))
        if index is None:
            index = self._item_ids.get(item_id) if item_id else None
            if index is None:
                return None
        item = self._items.get(index)
        if item is None:
            item = self._items[index] = _ResponseItem(_ITEM_KIND.get(t))
        if item_id:
            self._item_ids[item_id] = index
        return item

    def _on(self, t: str, d: dict) -> bool:
        out = super()._on(t, d)
        if t in _RESPONSE_LIFECYCLE:
            r = d.get("response")
            output = r.get("output") if r.__class__ is dict else None
            if output.__class__ is list:
                for index, raw in enumerate(output):
                    if raw.__class__ is dict:
                        item = self._items.get(index)
                        if item is None:
                            item = self._items[index] = _ResponseItem()
                        item.apply(raw)
            return out
        if not t.startswith("response."):
            return out
        if t in ("response.output_item.added", "response.output_item.done"):
            raw = d.get("item")
            item = self._item(d, t, _str(raw.get("id")) if raw.__class__ is dict else None)
            if item is not None:
                item.apply(raw)
            return out
        item = self._item(d, t, _str(d.get("item_id")))
        if item is None:
            return out
        ci = _idx(d.get("content_index")) or 0
        si = _idx(d.get("summary_index")) or 0
        delta = d.get("delta")
        if t == "response.output_text.delta":
            if delta.__class__ is str:
                item.text.setdefault(ci, []).append(delta)
        elif t == "response.output_text.done":
            if d.get("text").__class__ is str:
                item.text[ci] = [d["text"]]
        elif t == "response.refusal.delta":
            if delta.__class__ is str:
                item.refusal.setdefault(ci, []).append(delta)
        elif t == "response.refusal.done":
            if d.get("refusal").__class__ is str:
                item.refusal[ci] = [d["refusal"]]
        elif t in ("response.content_part.added", "response.content_part.done"):
            part = d.get("part")
            if part.__class__ is dict:
                item.part(ci, part)
        elif t == "response.function_call_arguments.delta":
            if delta.__class__ is str:
                item.arguments.append(delta)
        elif t == "response.function_call_arguments.done":
            if d.get("arguments").__class__ is str:
                item.arguments = [d["arguments"]]
        elif t == "response.reasoning_summary_part.added":
            item.summary.setdefault(si, [])
        elif t == "response.reasoning_summary_text.delta":
            if delta.__class__ is str:
                item.summary.setdefault(si, []).append(delta)
        elif t in ("response.reasoning_summary_text.done", "response.reasoning_summary_part.done"):
            part = d.get("part")
            text = part.get("text") if part.__class__ is dict else d.get("text")
            if text.__class__ is str:
                item.summary[si] = [text]
        elif t == "response.reasoning_text.delta":
            if delta.__class__ is str:
                item.reasoning.setdefault(ci, []).append(delta)
        elif t == "response.reasoning_text.done":
            if d.get("text").__class__ is str:
                item.reasoning[ci] = [d["text"]]
        return out

    def result(self) -> dict:
        out = {"dialect": self.dialect, "id": self.id, **self.as_dict(), "status": self.status}
        output = [self._items[i].result() for i in sorted(self._items)]
        out["output"] = output
        out["output_text"] = "".join(item["text"] for item in output if item.get("type") == "message")
        return out


class _Block:
    __slots__ = ("raw", "type", "text", "json", "thinking", "signature")

    def __init__(self) -> None:
        self.raw: dict = {}
        self.type: str | None = None
        self.text: list[str] = []
        self.json: list[str] = []
        self.thinking: list[str] = []
        self.signature: list[str] = []

    def result(self) -> dict:
        raw, kind = self.raw, self.type
        if kind == "text":
            return {"type": kind, "text": "".join(self.text)}
        if kind in ("tool_use", "server_tool_use"):
            out: dict[str, Any] = {"type": kind, "id": raw.get("id"), "name": raw.get("name")}
            joined = "".join(self.json)
            if joined:
                ok, value = _parse_json(joined)
                out["input"] = value if ok else None
                if not ok:
                    out["input_json"] = joined  # cut short or malformed: show what came
            else:
                out["input"] = raw.get("input")
            return out
        if kind == "thinking":
            return {"type": kind, "thinking": "".join(self.thinking), "signature": "".join(self.signature)}
        out = dict(raw)
        if kind is not None:
            out["type"] = kind
        if self.text:
            out["text"] = "".join(self.text)
        return out


class _AnthropicAssembly(_AnthropicSummary):
    __slots__ = ("_blocks", "_role", "_stop_sequence")

    def __init__(self) -> None:
        super().__init__()
        self._blocks: dict[int, _Block] = {}
        self._role: str | None = None
        self._stop_sequence: str | None = None

    def _block(self, d: dict) -> _Block | None:
        index = _idx(d.get("index"))
        if index is None:
            return None
        block = self._blocks.get(index)
        if block is None:
            block = self._blocks[index] = _Block()
        return block

    def _on(self, t: str, d: dict) -> bool:
        out = super()._on(t, d)
        if t == "content_block_delta":
            block = self._block(d)
            delta = d.get("delta")
            if block is None or delta.__class__ is not dict:
                return out
            kind = delta.get("type")
            if kind == "text_delta":
                pieces, value, implied = block.text, delta.get("text"), "text"
            elif kind == "input_json_delta":
                pieces, value, implied = block.json, delta.get("partial_json"), "tool_use"
            elif kind == "thinking_delta":
                pieces, value, implied = block.thinking, delta.get("thinking"), "thinking"
            elif kind == "signature_delta":
                pieces, value, implied = block.signature, delta.get("signature"), "thinking"
            else:
                return out
            if value.__class__ is str:
                pieces.append(value)
            if block.type is None:
                block.type = implied
        elif t == "content_block_start":
            block = self._block(d)
            cb = d.get("content_block")
            if block is not None and cb.__class__ is dict:
                block.raw = cb
                block.type = _str(cb.get("type")) or block.type
                for attr in ("text", "thinking", "signature"):  # usually "", but take what's there
                    value = cb.get(attr)
                    pieces = getattr(block, attr)
                    if value and value.__class__ is str and not pieces:
                        pieces.append(value)
        elif t == "message_start":
            msg = d.get("message")
            if msg.__class__ is dict:
                self._role = _str(msg.get("role"))
        elif t == "message_delta":
            delta = d.get("delta")
            if delta.__class__ is dict:
                self._stop_sequence = _str(delta.get("stop_sequence")) or self._stop_sequence
        return out

    def result(self) -> dict:
        out = {"dialect": self.dialect, "id": self.id, **self.as_dict()}
        out["role"] = self._role
        out["stop_reason"] = self.finish_reason
        out["stop_sequence"] = self._stop_sequence
        content = [self._blocks[i].result() for i in sorted(self._blocks)]
        out["content"] = content
        out["text"] = "".join(b["text"] for b in content if b.get("type") == "text")
        return out


_ASSEMBLIES: dict[str, type] = {
    CHAT: _ChatAssembly,
    COMPLETIONS: _CompletionsAssembly,
    RESPONSES: _ResponsesAssembly,
    MESSAGES: _AnthropicAssembly,
}


def assemble(provider: str, path: str, events: Iterable[Event]) -> dict:
    """The stream's result for people to read: the summary plus the content, per dialect.

    chat: ``choices`` (role, content, refusal, tool_calls with id/type/name/arguments and
    parsed_arguments when valid JSON, finish_reason); completions: ``choices`` (text,
    finish_reason); responses: ``output`` items (message text, function calls, reasoning
    summaries), ``output_text``, ``status``; anthropic: ``content`` blocks (text, tool_use with
    ``input`` parsed from the joined partial_json, thinking), ``stop_reason``. Always present:
    dialect, id, complete, error, model, finish_reason, usage, events.
    """
    acc = _ASSEMBLIES[dialect_for(provider, path)]()
    for event in events:
        acc.add(event)
    return acc.result()
