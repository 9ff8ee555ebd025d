"""A stream's result put back together for people to read (mitmweb's content view).

Pure: no I/O, no mitmproxy, no clock. Each dialect's assembly is that dialect's summary
(``dialects.py``) plus the content it accumulates: texts, tool calls, output items, blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from r4u_mitm.pure.dialects import (
    CHAT,
    COMPLETIONS,
    MESSAGES,
    RESPONSE_LIFECYCLE,
    RESPONSES,
    AnthropicSummary,
    ChatSummary,
    CompletionsSummary,
    ResponsesSummary,
    dialect_for,
    nonempty_str,
    parse_json,
)
from r4u_mitm.pure.sse import Event

__all__ = ["assemble"]


def _idx(value: Any) -> int | None:
    return value if value.__class__ is int else None


def _indexed(choices: list) -> Iterator[tuple[int, dict]]:
    """Each choice that is an object, with its ``index`` (its position when it has none)."""
    for pos, c in enumerate(choices):
        if c.__class__ is dict:
            index = _idx(c.get("index"))
            yield (pos if index is None else index), c


def _parsed_arguments(entry: dict, text: str) -> None:
    """Add ``parsed_arguments`` when the arguments are valid JSON."""
    ok, value = parse_json(text)
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
        ident = nonempty_str(tc.get("id"))
        if ident and self.id is None:
            self.id = ident  # a repeated id is the same id, not more of it
        kind = nonempty_str(tc.get("type"))
        if kind:
            self.type = kind
        if fn.__class__ is dict:
            name = nonempty_str(fn.get("name"))
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


class _ChatAssembly(ChatSummary):
    __slots__ = ("_choices_by_index",)

    def __init__(self) -> None:
        super().__init__()
        self._choices_by_index: dict[int, _ChatChoice] = {}

    def _choices(self, choices: list) -> bool:
        out = super()._choices(choices)
        for index, c in _indexed(choices):
            delta = c.get("delta")
            if delta.__class__ is not dict:
                delta = {}  # some servers send the finish without a delta
            ch = self._choices_by_index.get(index)
            if ch is None:
                ch = self._choices_by_index[index] = _ChatChoice(index)
            role = nonempty_str(delta.get("role"))
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
            fr = nonempty_str(c.get("finish_reason"))
            if fr:
                ch.finish_reason = fr
        return out

    @staticmethod
    def _tool_call(ch: _ChatChoice, tc: dict) -> None:
        calls = ch.tool_calls
        index = _idx(tc.get("index"))
        if index is None:  # servers that omit the index: a new id starts a new call
            ident = nonempty_str(tc.get("id"))
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


class _CompletionsAssembly(CompletionsSummary):
    __slots__ = ("_texts", "_finish_reasons")

    def __init__(self) -> None:
        super().__init__()
        self._texts: dict[int, list[str]] = {}
        self._finish_reasons: dict[int, str] = {}

    def _choices(self, choices: list) -> bool:
        out = super()._choices(choices)
        for index, c in _indexed(choices):
            parts = self._texts.setdefault(index, [])
            text = c.get("text")
            if text and text.__class__ is str:
                parts.append(text)
            fr = nonempty_str(c.get("finish_reason"))
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


# Responses text events: "<prefix>.delta" appends a piece, "<prefix>.done" replaces the pieces
# with the whole text: (the item's parts it goes to, the event's index field, the done event's field)
_RESPONSE_TEXTS = {
    "response.output_text": ("text", "content_index", "text"),
    "response.refusal": ("refusal", "content_index", "refusal"),
    "response.reasoning_text": ("reasoning", "content_index", "text"),
    "response.reasoning_summary_text": ("summary", "summary_index", "text"),
}


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
        kind = nonempty_str(raw.get("type"))
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


class _ResponsesAssembly(ResponsesSummary):
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
        if t in RESPONSE_LIFECYCLE:
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
            item = self._item(d, t, nonempty_str(raw.get("id")) if raw.__class__ is dict else None)
            if item is not None:
                item.apply(raw)
            return out
        item = self._item(d, t, nonempty_str(d.get("item_id")))
        if item is None:
            return out
        delta = d.get("delta")
        prefix, _, phase = t.rpartition(".")
        text = _RESPONSE_TEXTS.get(prefix)
        if text is not None and phase in ("delta", "done"):
            name, index_field, done_field = text
            parts, index = getattr(item, name), _idx(d.get(index_field)) or 0
            if phase == "delta":
                if delta.__class__ is str:
                    parts.setdefault(index, []).append(delta)
            elif d.get(done_field).__class__ is str:
                parts[index] = [d[done_field]]
        elif t in ("response.content_part.added", "response.content_part.done"):
            part = d.get("part")
            if part.__class__ is dict:
                item.part(_idx(d.get("content_index")) or 0, part)
        elif t == "response.function_call_arguments.delta":
            if delta.__class__ is str:
                item.arguments.append(delta)
        elif t == "response.function_call_arguments.done":
            if d.get("arguments").__class__ is str:
                item.arguments = [d["arguments"]]
        elif t == "response.reasoning_summary_part.added":
            item.summary.setdefault(_idx(d.get("summary_index")) or 0, [])
        elif t == "response.reasoning_summary_part.done":
            part = d.get("part")
            text = part.get("text") if part.__class__ is dict else d.get("text")
            if text.__class__ is str:
                item.summary[_idx(d.get("summary_index")) or 0] = [text]
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
                ok, value = parse_json(joined)
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


class _AnthropicAssembly(AnthropicSummary):
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
                block.type = nonempty_str(cb.get("type")) or block.type
                for attr in ("text", "thinking", "signature"):  # usually "", but take what's there
                    value = cb.get(attr)
                    pieces = getattr(block, attr)
                    if value and value.__class__ is str and not pieces:
                        pieces.append(value)
        elif t == "message_start":
            msg = d.get("message")
            if msg.__class__ is dict:
                self._role = nonempty_str(msg.get("role"))
        elif t == "message_delta":
            delta = d.get("delta")
            if delta.__class__ is dict:
                self._stop_sequence = nonempty_str(delta.get("stop_sequence")) or self._stop_sequence
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
