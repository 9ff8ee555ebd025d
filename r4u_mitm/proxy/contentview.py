"""A mitmproxy content view for LLM event streams (``text/event-stream``), for mitmweb and the
console: the stream's result put back together, the wire timing, then the events one by one.

Pure rendering on top of ``assembly.assemble`` and ``sse.SSEDecoder``: no I/O, no clock, and it
never raises (a view that raises makes mitmproxy fall back to raw, hiding what went wrong). What
it renders is bounded: it reads at most ``PARSE_LIMIT`` bytes of a body, lists at most
``MAX_EVENTS`` events and cuts long texts, and says so each time.

The dialect (Chat Completions, legacy Completions, Responses, Anthropic Messages) comes from the
flow's request path and provider when the view is given a flow; otherwise, or when the path says
nothing, it is sniffed from the events. The wire timing is computed here too, from the flow:
mitmproxy's timestamps (request start, response headers, last byte or error) and, for the first
output event, the arrival time of each piece the addon teed (``flows.PIECES_KEY``, which the addon
leaves on flows someone will look at, see ``addon.R4UTracer._restore_body``). A flow without
them (not traced, or saved without the addon) shows no time to first token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from mitmproxy import contentviews

from r4u_mitm.proxy import flows
from r4u_mitm.pure import assembly, dialects, hosts
from r4u_mitm.pure.encoding import BodyDecoder, decode_body
from r4u_mitm.pure.sse import Event, SSEDecoder

__all__ = ["EventStreamView", "VIEW", "register", "render", "sniff_dialect"]

NAME = "LLM Event Stream"  # the name in mitmweb's view menu; mitmweb's routes allow no parentheses
# What the addon leaves in flow.metadata for this view (saved with the flow by mitmproxy).
TRACE_KEY = "r4u.trace_id"
PROVIDER_KEY = "r4u.provider"  # the provider of the host rule that matched
TRUNCATED_KEY = "r4u.truncated"  # True: the trace R4U gets holds only the first part of a body

PARSE_LIMIT = 8 * 1024 * 1024  # bytes of a body read at most (~0.2 s of parsing, on mitmweb's loop)
MAX_EVENTS = 100  # events listed one by one
MAX_EVENT_CHARS = 4000  # characters of one event's rendering
MAX_TEXT_CHARS = 100_000  # characters of one assembled text (a message, arguments, a summary)
MAX_SNIFF = 50  # events looked at to guess the dialect

DIALECT_NAMES = {
    dialects.CHAT: "Chat Completions",
    dialects.COMPLETIONS: "Completions (legacy)",
    dialects.RESPONSES: "Responses",
    dialects.MESSAGES: "Anthropic Messages",
}
_ANTHROPIC_EVENTS = frozenset({
    "message_start", "message_delta", "message_stop",
    "content_block_start", "content_block_delta", "content_block_stop",
})
_RULE = "─" * 3


# ---------------------------------------------------------------------------------------------
# The view


class EventStreamView(contentviews.Contentview):
    """mitmproxy 12's ``Contentview``: ``name``, ``syntax_highlight``, ``prettify``,
    ``render_priority``."""

    name = NAME
    syntax_highlight = "none"

    def prettify(self, data: bytes, metadata: Any) -> str:
        return render(data, metadata)

    def render_priority(self, data: bytes, metadata: Any) -> float:
        """Above every built-in view for event streams (the highest built-in, GraphQL, says 2 for
        its JSON); a little above raw (0.1) for a body without a content type that starts like an
        event stream; never otherwise."""
        try:
            content_type = getattr(metadata, "content_type", None)
            if content_type == "text/event-stream":
                return 3.0
            if content_type is None and isinstance(data, (bytes, bytearray)):
                head = bytes(data[:16]).lstrip(b"\xef\xbb\xbf")
                if head.startswith((b"data:", b"event:")):
                    return 0.2
        except Exception:  # noqa: BLE001 - a view's priority must never fail the view selection
            pass
        return -1.0


VIEW = EventStreamView()


def register() -> bool:
    """Add the view to mitmproxy's registry, once: a script reload (which re-runs the addon's
    ``load``) finds it there and leaves it (re-adding the same name would only replace it).
    Never raises: without the view, the tracer still traces. True when the view is registered."""
    try:
        if contentviews.registry.get(NAME.lower()) is not VIEW:
            contentviews.add(VIEW)
        return True
    except Exception as exc:  # noqa: BLE001
        logging.getLogger("r4u_mitm").warning("r4u-mitm: could not add the %s view: %r", NAME, exc)
        return False


# ---------------------------------------------------------------------------------------------
# Rendering


def render(data: bytes, metadata: Any = None) -> str:
    """The whole rendering. Never raises: a failure inside one section is shown in its place."""
    out: list[str] = []
    try:
        _render(data, metadata, out)
    except Exception as exc:  # noqa: BLE001 - belt and braces: show what failed, and the bytes
        out.append(f"[{NAME} view failed: {type(exc).__name__}: {_cut(str(exc), 300)}]")
        try:
            out.append(_cut(bytes(data[:4000]).decode("utf-8", "replace"), 4000))
        except Exception:  # noqa: BLE001
            pass
    return "\n".join(out)


def _render(data: bytes, metadata: Any, out: list[str]) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = b"" if data is None else str(data).encode("utf-8", "replace")
    data = bytes(data)
    flow = getattr(metadata, "flow", None)
    request = getattr(flow, "request", None)
    path = _text_attr(request, "path")
    method = _text_attr(request, "method")
    fmeta = getattr(flow, "metadata", None)
    fmeta = fmeta if isinstance(fmeta, dict) else {}

    notes: list[str] = []
    data = _maybe_decode(data, metadata, notes)
    total = len(data)
    if total > PARSE_LIMIT:
        notes.append(f"only the first {_size(PARSE_LIMIT)} of {_size(total)} were read")
        data = data[:PARSE_LIMIT]

    decoder = SSEDecoder()
    events = decoder.feed(data)
    decoder.finish()
    if decoder.pending:
        notes.append("the body ends inside an event (not complete, so not shown)")

    provider = _provider(fmeta, request)
    dialect, how = _dialect(provider, path, events)
    result = assembly.assemble(provider or "", _path_for(dialect), events) if dialect else None

    # Heading
    title = f"{DIALECT_NAMES.get(dialect, dialect)} stream" if dialect else "Event stream"
    where = " ".join(p for p in (method, path.partition("?")[0]) if p)
    out.append(" · ".join(p for p in (title, provider or "", where) if p) + ("" if how == "flow" else f"  [{how}]"))
    trace_id = fmeta.get(TRACE_KEY)
    if isinstance(trace_id, str) and trace_id:
        out.append(f"r4u trace {trace_id}")
    if result is not None:
        out.append(_status_line(result, len(events), truncated=total > PARSE_LIMIT))
    for note in notes:
        out.append(f"note: {note}")
    out.append("")

    # Result
    if result is not None:
        out.append(f"{_RULE} Assembled result {_RULE}")
        _section(out, _result_lines, dialect, result)
        out.append("")

    # Wire timing
    timing = _section_lines(_timing_lines, flow, metadata, fmeta, provider, dialect, len(events))
    if timing:
        out.append(f"{_RULE} Wire timing {_RULE}")
        out.extend(timing)
        out.append("")

    # Events
    shown = events[:MAX_EVENTS]
    out.append(f"{_RULE} Events ({len(events)}) {_RULE}")
    if not events:
        out.append("(no complete event)" if data else "(empty body)")
        if data:
            out.append(_indent(_cut(data[:2000].decode("utf-8", "replace"), 2000), 2))
    for number, event in enumerate(shown, 1):
        _section(out, _event_lines, number, event)
    if len(events) > len(shown):
        out.append(f"… {len(events) - len(shown)} more events (not shown)")
    if total > PARSE_LIMIT:
        out.append(f"… and the body beyond the first {_size(PARSE_LIMIT)} was not read")


def _section(out: list[str], fn, *args) -> None:
    out.extend(_section_lines(fn, *args))


def _section_lines(fn, *args) -> list[str]:
    """Lines of one section; a failure inside it becomes one line saying so."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001
        return [f"[could not render this part: {type(exc).__name__}: {_cut(str(exc), 200)}]"]


def _maybe_decode(data: bytes, metadata: Any, notes: list[str]) -> bytes:
    """mitmproxy hands the view the decoded body, or the raw one when its Content-Encoding did not
    decode (a cut gzip stream, say). Then decode what can be, incrementally, and say so."""
    message = getattr(metadata, "http_message", None)
    headers = getattr(message, "headers", None)
    if headers is None:
        return data
    encoding = headers.get("content-encoding", "")
    if not encoding or encoding.strip().lower() in ("identity", "none"):
        return data
    raw = getattr(message, "raw_content", None)
    if raw is None or raw != data:
        return data  # mitmproxy decoded it
    decoded, _, error = decode_body(encoding, data, PARSE_LIMIT + 1)
    if error:
        notes.append(f"body did not decode as {encoding!r} ({_cut(error, 200)}); showing what decoded")
    return decoded if decoded or not error else data


def _provider(fmeta: dict, request: Any) -> str | None:
    provider = fmeta.get(PROVIDER_KEY)
    if isinstance(provider, str) and provider in hosts.PROVIDERS:
        return provider
    host = (_text_attr(request, "pretty_host") or _text_attr(request, "host")).lower().rstrip(".")
    return hosts.infer_provider(host) if host else None


def _dialect(provider: str | None, path: str, events: list[Event]) -> tuple[str | None, str]:
    """(dialect, how it was chosen). The flow decides when its path names the API; a path that
    says nothing (``dialect_for``'s chat fallback) or no flow at all: sniff the events. None when
    nothing says it is an LLM stream (any other event stream: shown as events only)."""
    if path or provider == hosts.ANTHROPIC:
        dialect = dialects.dialect_for(provider or "", path)
        bare = path.partition("?")[0].partition("#")[0].rstrip("/").lower()
        if dialect != dialects.CHAT or bare.endswith("/chat/completions"):
            return dialect, "flow"
    dialect = _sniff(events)
    if dialect is None:
        return None, "not recognised as an LLM API stream"
    return dialect, "guessed from the events"


def _path_for(dialect: str) -> str:
    """A path that ``dialects.dialect_for`` maps to ``dialect`` (assemble takes provider+path)."""
    return {
        dialects.RESPONSES: "/v1/responses",
        dialects.MESSAGES: "/v1/messages",
        dialects.COMPLETIONS: "/v1/completions",
    }.get(dialect, "/v1/chat/completions")


def sniff_dialect(events: Iterable[Event]) -> str:
    """Guess the dialect from the first events: Responses and Anthropic name their events (and
    repeat the name as the JSON ``type``); legacy Completions chunks carry ``text``, chat chunks
    a ``delta``. Chat when nothing tells."""
    return _sniff(events) or dialects.CHAT


def _sniff(events: Iterable[Event]) -> str | None:
    for n, event in enumerate(events):
        if n >= MAX_SNIFF:
            break
        name = event.event
        if name.startswith("response."):
            return dialects.RESPONSES
        if name in _ANTHROPIC_EVENTS:
            return dialects.MESSAGES
        ok, d = dialects.parse_json(event.data)
        if not ok or not isinstance(d, dict):
            continue
        kind = d.get("type")
        if isinstance(kind, str):
            if kind.startswith("response."):
                return dialects.RESPONSES
            if kind in _ANTHROPIC_EVENTS:
                return dialects.MESSAGES
        obj = d.get("object")
        if obj == "text_completion":
            return dialects.COMPLETIONS
        if obj == "chat.completion.chunk":
            return dialects.CHAT
        choices = d.get("choices")
        if isinstance(choices, list):
            for c in choices:
                if isinstance(c, dict):
                    if "delta" in c:
                        return dialects.CHAT
                    if "text" in c:
                        return dialects.COMPLETIONS
        elif isinstance(d.get("error"), dict) and n == 0:
            return dialects.CHAT  # an OpenAI error payload as the first event
    return None


# -- heading ---------------------------------------------------------------------------------------


def _status_line(result: dict, n_events: int, truncated: bool) -> str:
    """How the stream ended, its finish reason and event count; then model and id; then the
    provider's error, if any."""
    parts = []
    if truncated:
        parts.append("complete: unknown (body not read to the end)")
    elif result.get("complete"):
        parts.append("complete" if not result.get("error") else "ended by a provider error")
    else:
        parts.append("INCOMPLETE: no terminal event")
    if result.get("finish_reason"):
        parts.append(f"finish_reason {result['finish_reason']}")
    parts.append(f"{n_events} event{'' if n_events == 1 else 's'}")
    lines = [" · ".join(parts)]
    ident = [f"{key} {result[key]}" for key in ("model", "id") if result.get(key)]
    if ident:
        lines.append(" · ".join(ident))
    if result.get("error"):
        lines.append(f"error: {result['error']}")
    return "\n".join(lines)


# -- the assembled result ---------------------------------------------------------------------


def _result_lines(dialect: str, result: dict) -> list[str]:
    lines: list[str] = []
    if dialect == dialects.CHAT:
        _chat(result, lines)
    elif dialect == dialects.COMPLETIONS:
        _completions(result, lines)
    elif dialect == dialects.RESPONSES:
        _responses(result, lines)
    else:
        _anthropic(result, lines)
    if result.get("finish_reason"):
        lines.append(f"finish reason: {result['finish_reason']}")
    usage = result.get("usage")
    if isinstance(usage, dict) and usage:
        lines.append("usage:")
        lines.extend(f"  {k}: {v}" for k, v in _flatten(usage))
    elif dialect != dialects.MESSAGES:
        lines.append("usage: (not sent)")
    return lines


def _chat(result: dict, lines: list[str]) -> None:
    choices = result.get("choices") or []
    if not choices:
        lines.append("(no choice)")
    for ch in choices:
        head = [f"choice {ch.get('index')}"]
        if ch.get("role"):
            head.append(str(ch["role"]))
        head.append(f"finish_reason: {ch.get('finish_reason') or '-'}")
        lines.append(" · ".join(head))
        empty = True
        for key, label in (("reasoning", "reasoning"), ("content", "text"), ("refusal", "REFUSAL")):
            value = ch.get(key)
            if isinstance(value, str) and (value or key == "content"):
                lines.append(f"  {label}:")
                lines.append(_indent(_cut(value, MAX_TEXT_CHARS), 4) if value else "    (empty)")
                empty = False
        for n, call in enumerate(ch.get("tool_calls") or []):
            _call(lines, f"tool call {n}", call, call.get("arguments"), call.get("parsed_arguments", _NOTHING),
                  ("id", "type"))
            empty = False
        fc = ch.get("function_call")
        if isinstance(fc, dict):
            _call(lines, "function call", fc, fc.get("arguments"), fc.get("parsed_arguments", _NOTHING), ())
            empty = False
        if empty:
            lines.append("  (no content)")


_NOTHING = object()


def _call(lines: list[str], label: str, call: dict, args: Any, parsed: Any, extra: tuple[str, ...]) -> None:
    head = [f"  {label}: {call.get('name') or '?'}"]
    head.extend(f"{k} {call[k]}" for k in extra if call.get(k))
    lines.append(" · ".join(head))
    _arguments(lines, args, parsed, "arguments")


def _arguments(lines: list[str], raw: Any, parsed: Any, label: str) -> None:
    if parsed is not _NOTHING:
        lines.append(f"    {label}:")
        lines.append(_indent(_cut(_pretty(parsed), MAX_TEXT_CHARS), 6))
    elif isinstance(raw, str) and raw:
        lines.append(f"    {label} (not valid JSON, as sent):")
        lines.append(_indent(_cut(raw, MAX_TEXT_CHARS), 6))
    else:
        lines.append(f"    {label}: (none)")


def _completions(result: dict, lines: list[str]) -> None:
    choices = result.get("choices") or []
    if not choices:
        lines.append("(no choice)")
    for ch in choices:
        lines.append(f"choice {ch.get('index')} · finish_reason: {ch.get('finish_reason') or '-'}")
        lines.append("  text:")
        text = ch.get("text") or ""
        lines.append(_indent(_cut(text, MAX_TEXT_CHARS), 4) if text else "    (empty)")


def _responses(result: dict, lines: list[str]) -> None:
    if result.get("status"):
        lines.append(f"status: {result['status']}")
    output = result.get("output") or []
    if not output:
        lines.append("(no output item)")
    for n, item in enumerate(output):
        kind = item.get("type") or "?"
        head = [f"output {n}: {kind}"]
        head.extend(f"{k} {item[k]}" for k in ("role", "status") if item.get(k))
        lines.append(" · ".join(head))
        if kind == "message":
            text = item.get("text") or ""
            lines.append("  text:")
            lines.append(_indent(_cut(text, MAX_TEXT_CHARS), 4) if text else "    (empty)")
            if item.get("refusal"):
                lines.append("  REFUSAL:")
                lines.append(_indent(_cut(item["refusal"], MAX_TEXT_CHARS), 4))
        elif kind == "function_call":
            _call(lines, "function", item, item.get("arguments"), item.get("parsed_arguments", _NOTHING), ("call_id",))
        elif kind == "reasoning":
            for i, part in enumerate(item.get("summary") or []):
                lines.append(f"  summary {i}:")
                lines.append(_indent(_cut(str(part), MAX_TEXT_CHARS), 4))
            for i, part in enumerate(item.get("content") or []):
                lines.append(f"  reasoning text {i}:")
                lines.append(_indent(_cut(str(part), MAX_TEXT_CHARS), 4))
            if not item.get("summary") and not item.get("content"):
                lines.append("  (no summary)")
        else:
            lines.append(_indent(_cut(_pretty(item), MAX_TEXT_CHARS), 2))


def _anthropic(result: dict, lines: list[str]) -> None:
    head = [f"role {result.get('role') or '-'}", f"stop_reason {result.get('stop_reason') or '-'}"]
    if result.get("stop_sequence"):
        head.append(f"stop_sequence {result['stop_sequence']!r}")
    lines.append(" · ".join(head))
    content = result.get("content") or []
    if not content:
        lines.append("(no content block)")
    for n, block in enumerate(content):
        kind = block.get("type") or "?"
        if kind == "text":
            lines.append(f"block {n}: text")
            text = block.get("text") or ""
            lines.append(_indent(_cut(text, MAX_TEXT_CHARS), 4) if text else "    (empty)")
        elif kind in ("tool_use", "server_tool_use"):
            lines.append(" · ".join([f"block {n}: {kind} {block.get('name') or '?'}"]
                                    + ([f"id {block['id']}"] if block.get("id") else [])))
            if "input_json" in block:
                _arguments(lines, block.get("input_json"), _NOTHING, "input")
            else:
                _arguments(lines, None, block.get("input"), "input")
        elif kind == "thinking":
            signature = block.get("signature") or ""
            lines.append(f"block {n}: thinking" + (f" · signature {len(signature)} chars" if signature else ""))
            thinking = block.get("thinking") or ""
            lines.append(_indent(_cut(thinking, MAX_TEXT_CHARS), 4) if thinking else "    (empty)")
        else:
            lines.append(f"block {n}: {kind}")
            lines.append(_indent(_cut(_pretty(block), MAX_TEXT_CHARS), 4))


# -- wire timing -------------------------------------------------------------------------------


def _timing_lines(flow: Any, metadata: Any, fmeta: dict, provider: str | None, dialect: str | None,
                  n_events: int) -> list[str]:
    """The flow's timing as mitmproxy stamped it, the first output event's as the teed pieces
    arrived (what the record says, measured the same way), the events and the body's bytes."""
    lines = []
    request, response = getattr(flow, "request", None), getattr(flow, "response", None)
    start = _num(getattr(request, "timestamp_start", None))
    raw = _raw_body(flow, metadata)
    if start is not None:
        headers_at = _num(getattr(response, "timestamp_start", None))
        error = getattr(flow, "error", None)
        end = _num(getattr(error, "timestamp", None)) if error else _num(getattr(response, "timestamp_end", None))
        if headers_at is not None:
            lines.append(f"time to first byte (response headers): {_msf((headers_at - start) * 1000)}")
        if dialect is not None:
            lines.append(f"time to first token (first output event): "
                         f"{_first_output(raw, metadata, fmeta, provider, dialect, start, end)}")
        if end is not None:
            lines.append(f"duration (request start to last byte): {_msf((end - start) * 1000)}")
    counts = [f"{n_events} event{'' if n_events == 1 else 's'}"]
    if raw is not None:
        counts.append(f"{len(raw)} bytes on the wire")
    lines.append(" · ".join(counts))
    if fmeta.get(TRUNCATED_KEY) is True:
        lines.append("the trace is truncated (r4u_max_body_bytes or r4u_memory_mb): R4U got only the first part")
    if start is not None:
        lines.append("(request start = 0" + ("; first token: when the piece that completed it arrived)"
                                             if dialect is not None else ")"))
    return lines


def _raw_body(flow: Any, metadata: Any) -> bytes | None:
    """The response body as it came (before any Content-Encoding was undone)."""
    message = getattr(metadata, "http_message", None)
    if message is None or message is not getattr(flow, "response", None):
        return None
    raw = getattr(message, "raw_content", None)
    return raw if isinstance(raw, bytes) else None


def _first_output(raw: bytes | None, metadata: Any, fmeta: dict, provider: str | None, dialect: str,
                  start: float, end: float | None) -> str:
    """The time to the first output event: when the teed piece that completed it arrived (the
    record's ``ttft_ms``), from the pieces' sizes and arrival times the addon left on the flow.
    Reads pieces only up to that event."""
    saved = flows.saved_pieces(fmeta, raw, start)
    unknown = "not known (no arrival times of this body's pieces on the flow)"
    if saved is None:
        return unknown
    sizes, walls = saved
    headers = getattr(metadata.http_message, "headers", None)
    body = BodyDecoder(headers.get("content-encoding") if headers is not None else None, PARSE_LIMIT)
    decoder = SSEDecoder()
    summary = dialects.stream_summary(provider or "", _path_for(dialect))
    offset = 0
    for size, at in zip(sizes, walls):
        piece = raw[offset:offset + size]
        offset += size
        if any(summary.add(event) for event in decoder.feed(body.feed(piece))):
            return _msf((at - start) * 1000)
        if body.truncated:
            return f"not in the first {_size(PARSE_LIMIT)} read"
    if end is not None and any(summary.add(event) for event in decoder.feed(body.finish())):
        return _msf((end - start) * 1000)  # the decoder's last bytes came with the end of the body
    return "none (no output event)"


# -- events --------------------------------------------------------------------------------------


def _event_lines(number: int, event: Event) -> list[str]:
    head = [f"#{number} {event.event}"]
    if event.id:
        head.append(f"id {event.id}")
    if event.retry is not None:
        head.append(f"retry {event.retry}")
    data = event.data
    ok, value = dialects.parse_json(data) if data[:1] in ("{", "[") else (False, None)
    if ok:
        body = _pretty(value)
    else:
        body = data
    if "\n" not in body and len(body) <= 100 and not ok:
        return [" · ".join(head) + f": {body}"]
    return [" · ".join(head), _indent(_cut(body, MAX_EVENT_CHARS), 2)]


# -- small helpers --------------------------------------------------------------------------------


def _pretty(value: Any) -> str:
    try:
        return json.dumps(value, indent=2, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        return repr(value)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, name + "."))
        else:
            out.append((name, value if not isinstance(value, (dict, list)) else _cut(_pretty(value), 200)))
    return out


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n… ({len(text) - limit} more characters)"


def _indent(text: str, n: int) -> str:
    pad = " " * n
    return "\n".join(pad + line for line in text.split("\n"))


def _text_attr(obj: Any, name: str) -> str:
    try:
        value = getattr(obj, name, "") if obj is not None else ""
    except Exception:  # noqa: BLE001 - e.g. a property that fails on a half-built message
        return ""
    return value if isinstance(value, str) else ""


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _msf(ms: float) -> str:
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"
