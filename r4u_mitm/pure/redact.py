"""What is secret in a trace, and how it is taken out: header values, URL query parameters, and
the members of JSON bodies that carry credentials (requests, answers, each event of a stream).

Pure: knows nothing of mitmproxy. Runs once per exchange in the proxy's spool writer thread (on
bodies that are not content-encoded, before they reach the disk) and again in the deliverer, as
the record is built; a body without a secret-looking key costs a lowercased, reversed copy of its
UTF-8 bytes and one regex scan (two if it holds a backslash), nothing more.

Body members. A key is a secret name when, lowercased, it is one of `SECRET_BODY_KEYS` or the
extra names, with `_`, `-` or nothing where a name has a word break: `api_key` also takes
`apiKey`, `API-KEY` and `apikey` (case is ASCII case). Keys spelled with JSON escapes
(`"api\\u005fkey"`) count as what they decode to. Some endpoints add names of their own
(`PATH_SECRET_KEYS`). The value of such a key, whatever its type (a string, Realtime's
`client_secret` object, a number), becomes the JSON string "[REDACTED]"; `null` stays. Inside an
`authentication` object (Azure "On Your Data"), every member whose name contains `key`, `token`,
`secret`, `password` or `credential` is a secret too (`key`, `key_id`), and so is a value of
`authentication` that is neither an object nor an array; inside a `headers` object (MCP tools),
members are judged as HTTP headers (`is_secret_header`). Everything else, token counts and
limits above all, stays, and so does every byte outside the replaced values: no re-serialisation.

What is walked: a body whose text starts with `{` or `[` (JSON, or JSON values in a row such as
JSON Lines), and for event streams the payload of each `data:` line. Where that is not valid JSON
(a body cut by `r4u_max_body_bytes`, JSON spread over several `data:` lines), a fallback replaces
the value of each secret or container key spelled without escapes, up to the end of the text when
the value is cut short: an `authentication` or `headers` object is then replaced whole. Not
covered: escaped keys in that fallback, members of an object that continues on the next `data:`
line, secrets in free text (a prompt that quotes a key), bodies that are not JSON (form-encoded,
plain text), and stream lines other than `data:` unless they hold a secret-looking key (then the
fallback applies to the line).
"""

from __future__ import annotations

import functools
import json
import re
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from json.decoder import scanstring
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "[REDACTED]"
_REDACTED_JSON = json.dumps(REDACTED)

# Header names whose values are secrets, whatever the provider. `SECRET_HEADER_PARTS` catches
# the rest by name (`x-goog-api-key`, `x-auth-token`, ...) without taking useful headers such as
# `x-ratelimit-remaining-tokens` (ends in `-tokens`, not `-token`).
SECRET_HEADERS = frozenset({
    "authorization", "proxy-authorization", "api-key", "x-api-key", "openai-api-key",
    "anthropic-api-key", "cookie", "set-cookie",
})
SECRET_HEADER_PARTS = ("api-key", "apikey", "secret", "auth")
SECRET_HEADER_SUFFIXES = ("-key", "-token")
SECRET_QUERY_PARAMS = frozenset({
    "api-key", "api_key", "apikey", "key", "token", "access_token", "sig", "signature", "secret",
    "client_secret", "password",
})

# JSON member names whose values are secrets anywhere in a body. Not `key` nor `token`: tool
# schemas have properties named "key", and logprobs carry a "token" per output token.
SECRET_BODY_KEYS = (
    "api_key", "x_api_key", "encoded_api_key", "private_key", "client_secret", "secret", "password",
    "access_token", "refresh_token", "id_token", "authorization", "authorization_token",
    "connection_string",
)
# Endpoints whose answer holds a secret under a name too generic to redact everywhere: Realtime's
# `POST /v1/realtime/client_secrets` returns its ephemeral key (`ek_...`) as the top-level `value`.
PATH_SECRET_KEYS = {"/realtime/client_secrets": ("value",)}
AUTH_OBJECT = "authentication"
HEADERS_OBJECT = "headers"
AUTH_MEMBER_PARTS = ("key", "token", "secret", "password", "credential")

WINDOW = 256 * 1024  # characters pre-checked in one go: well under a millisecond of GIL
_SECRET = "secret"  # a member whose value goes (the other kinds: AUTH_OBJECT, HEADERS_OBJECT)
_WORD_BREAK = re.compile(r"[\s_-]+|(?<=[a-z0-9])(?=[A-Z])")
_SEPARATOR = None  # an atom: `_`, `-` or nothing
_WS = re.compile(r"[ \t\n\r]*")
_JSON_START = re.compile(r"[ \t\n\r]*[{\[]")
_LINE_END = re.compile(r"[\r\n]")
_CUT = re.compile(r"[^ \t\n\r]{2}")  # a key match spans such a pair only within `"name":`
_CUT_BYTES = re.compile(_CUT.pattern.encode())
_CUT_SPAN = 4096  # characters searched for a cut at a time (one is nearly always within the first two)
# A key holding a \u escape, which may spell a secret name; matched from its last escape.
_ESCAPED_KEY = re.compile(r'\\u[0-9a-f]{4}(?:[^"\\]|\\[^u])*"[ \t\n\r]*:')
_ESCAPED_KEY_BYTES = re.compile(_ESCAPED_KEY.pattern.encode())
_BACKSLASH = ord("\\")  # as an int, `in` finds it in bytes at once: a bytes needle costs ~0.5 µs a call
_scan = json.JSONDecoder(strict=False).scan_once  # the end of any JSON value, in C
_NOT_JSON = (ValueError, IndexError, StopIteration, RecursionError)


@functools.lru_cache(maxsize=4096)  # a few dozen names recur in every record: 1.5 µs each uncached
def is_secret_header(name: str, extra: frozenset[str] = frozenset()) -> bool:
    key = name.lower()
    return (
        key in SECRET_HEADERS
        or key in extra
        or any(part in key for part in SECRET_HEADER_PARTS)
        or key.endswith(SECRET_HEADER_SUFFIXES)
    )


def redact_pairs(pairs: Iterable[tuple[str, str]], extra: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Header pairs with secret values replaced, names and order kept (what the spool stores)."""
    return [(name, REDACTED if is_secret_header(name, extra) else value) for name, value in pairs]


def redact_url(url: str) -> str:
    """The URL with secret-bearing query parameters (Azure `api-key=`, Google `key=`) redacted."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    query = [
        (k, REDACTED if k.lower() in SECRET_QUERY_PARAMS else v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(query, safe="[]")))


def body_redactor(extra_keys: Iterable[str] = (), path: str = "") -> BodyRedactor:
    """The redactor for the bodies of a request to `path` (without its query): the default names,
    `extra_keys`, and the endpoint's own (`PATH_SECRET_KEYS`)."""
    own = next((keys for suffix, keys in PATH_SECRET_KEYS.items() if path.rstrip("/").endswith(suffix)), ())
    return _redactor((*extra_keys, *own))


@functools.lru_cache(maxsize=32)
def _redactor(extra_keys: tuple[str, ...]) -> BodyRedactor:
    return BodyRedactor(extra_keys)  # made once per set of names: compiling its patterns takes a while


class BodyRedactor:
    """Replaces the values of secret members in JSON bodies and event streams (see the module)."""

    def __init__(self, extra_keys: Iterable[str] = ()) -> None:
        names = [atoms for atoms in map(_atoms, (*SECRET_BODY_KEYS, *extra_keys)) if atoms]
        keys = [*names, _atoms(AUTH_OBJECT), _atoms(HEADERS_OBJECT)]
        self._is_secret = re.compile(_pattern(names)).fullmatch
        # `"name"\s*:` for every secret or container name: where hits are, and the fallback's keys
        self._keys = re.compile('"' + _pattern(keys) + r'"[ \t\n\r]*:[ \t\n\r]*')
        # The pre-check: the same, read backwards in the body's lowercased UTF-8, where it is
        # tried at each `:` (one per key) rather than at each `"` (two per key, two per value).
        self._gate = re.compile((r':[ \t\n\r]*+"' + _pattern(keys, backwards=True) + '"').encode())
        # how far before a window's start a key it must see can begin (all escaped, `\uXXXX`)
        self._reach = 6 * max(map(len, keys)) + 8

    def json(self, text: str, raw: bytes | None = None) -> str:
        """A JSON body with its secret values replaced; any other text as it is. `raw`: the
        bytes `text` was decoded from as UTF-8, when at hand (see `suspect`)."""
        if not _JSON_START.match(text) or not self.suspect(text if raw is None else raw):
            return text
        low = _ascii_lower(text)
        return self._redact(text, low, self._hits(low))

    def event_stream(self, text: str, raw: bytes | None = None) -> str:
        """An event stream's text with the secret values of each `data:` line's JSON replaced.
        `raw`: as for `json`."""
        if not self.suspect(text if raw is None else raw):
            return text
        out: list[str] = []
        last = 0
        for at in self._hits(_ascii_lower(text)):
            if at < last:
                continue  # in a line already done
            start = max(text.rfind("\n", last, at), text.rfind("\r", last, at)) + 1
            found = _LINE_END.search(text, at)
            end = found.start() if found else len(text)
            line = text[start:end]
            if line.startswith("data:"):
                start += 6 if line.startswith("data: ") else 5
                payload = text[start:end]
                low = _ascii_lower(payload)
                redacted = self._redact(payload, low, self._hits(low))
            else:
                redacted = _splice(line, self._fallback(line, _ascii_lower(line)))
            out += (text[last:start], redacted)
            last = end
        out.append(text[last:])
        return "".join(out)

    def suspect(self, body) -> bool:
        """Whether a body may hold a secret key: False for nearly every body, cheaply. It is read
        as lowercased UTF-8: the bytes the text was decoded from, when the caller has them (where
        they did not decode, the text has U+FFFD, in no key name), else the text encoded again
        (a text with one character beyond Latin-1 is held in two or four bytes a character:
        encoding it costs more than reading it), or a body still in pieces (any sized object
        whose slices are bytes: the spool's `UnjoinedBody`). A long body is read a window at a time,
        other threads (the proxy's event loop) having the GIL in between; each window is cut
        between two non-blank characters and starts `_reach` early, so a key cut by one is whole
        in the next."""
        cut = _CUT if isinstance(body, str) else _CUT_BYTES
        start, size = 0, len(body)
        while start < size:
            end = _cut_after(body, start + WINDOW, size, cut)
            window = body[max(0, start - self._reach):end]
            low = (window.encode("utf-8", "surrogatepass") if isinstance(window, str) else window).lower()
            if self._gate.search(low[::-1]) or (_BACKSLASH in low and _ESCAPED_KEY_BYTES.search(low)):
                return True
            start = end
            if start < size:
                time.sleep(0)
        return False

    def _hits(self, low: str) -> list[int]:
        """Where the secret-looking keys are in `low` (the text, ASCII-lowercased)."""
        return sorted([m.start() for m in self._keys.finditer(low)]
                      + [m.start() for m in _ESCAPED_KEY.finditer(low)])

    def _redact(self, text: str, low: str, hits: list[int]) -> str:
        if not hits:
            return text
        try:
            spans = self._spans(text, hits)
        except _NOT_JSON:
            spans = self._fallback(text, low)
        return _splice(text, spans)

    def _kind(self, key: str, parent: str | None) -> str | None:
        low = _ascii_lower(key)
        if (self._is_secret(low)
                or (parent == AUTH_OBJECT and any(part in low for part in AUTH_MEMBER_PARTS))
                or (parent == HEADERS_OBJECT and is_secret_header(low))):
            return _SECRET
        return low if low in (AUTH_OBJECT, HEADERS_OBJECT) else None

    def _spans(self, text: str, hits: list[int]) -> list[tuple[int, int]]:
        """(start, end) of each secret value of `text`, one or more JSON values in a row. Raises
        one of `_NOT_JSON` where the text is not JSON. Objects and arrays with no hit inside are
        stepped over (their end found in C), so a big body with one secret is walked only along
        the way to it."""
        spans: list[tuple[int, int]] = []

        def value(i: int, kind: str | None) -> int:
            c = text[i]
            if c == "{" or c == "[":
                if kind is None:
                    end = _scan(text, i)[1]
                    k = bisect_left(hits, i)
                    if k == len(hits) or hits[k] >= end:
                        return end
                return members(i, kind) if c == "{" else items(i)
            if c == '"':
                return scanstring(text, i + 1, False)[1]
            return _scan(text, i)[1]

        def members(i: int, parent: str | None) -> int:
            i = _ws(text, i + 1)
            if text[i] == "}":
                return i + 1
            while True:
                if text[i] != '"':
                    raise ValueError("a key expected")
                key, i = scanstring(text, i + 1, False)
                i = _ws(text, i)
                if text[i] != ":":
                    raise ValueError("':' expected")
                i = _ws(text, i + 1)
                kind = self._kind(key, parent)
                if kind == _SECRET or (kind == AUTH_OBJECT and text[i] not in "{["):
                    end = _scan(text, i)[1]
                    if not text.startswith("null", i):
                        spans.append((i, end))
                    i = end
                else:
                    i = value(i, kind)
                i = _ws(text, i)
                if text[i] == "}":
                    return i + 1
                if text[i] != ",":
                    raise ValueError("',' expected")
                i = _ws(text, i + 1)

        def items(i: int) -> int:
            i = _ws(text, i + 1)
            if text[i] == "]":
                return i + 1
            while True:
                i = _ws(text, value(i, None))
                if text[i] == "]":
                    return i + 1
                if text[i] != ",":
                    raise ValueError("',' expected")
                i = _ws(text, i + 1)

        i = _ws(text, 0)
        while i < len(text):
            i = _ws(text, value(i, None))
        return spans

    def _fallback(self, text: str, low: str) -> list[tuple[int, int]]:
        """For text that is not (whole) JSON: the value after each `"name":` of a secret or
        container name, to its end, or to the end of the text when it is cut short."""
        spans: list[tuple[int, int]] = []
        for m in self._keys.finditer(low):
            i = m.end()
            if m.start() < (spans[-1][1] if spans else 0) or i >= len(text) or text.startswith("null", i):
                continue
            try:
                end = _scan(text, i)[1]
            except _NOT_JSON:
                end = len(text)
            spans.append((i, end))
        return spans


def _cut_after(body, at: int, size: int, cut: re.Pattern) -> int:
    """Where `body` (of `size`) is first cut between two non-blank characters at or after `at`
    (see `suspect`), or its end; read a little at a time (a slice of a body in pieces is a join)."""
    while at < size:
        found = cut.search(body[at:at + _CUT_SPAN])
        if found:
            return at + found.start() + 1
        at += _CUT_SPAN - 1  # a pair across the slice's end is in the next
    return size


def _splice(text: str, spans: list[tuple[int, int]]) -> str:
    if not spans:
        return text
    out: list[str] = []
    last = 0
    for start, end in spans:
        out += (text[last:start], _REDACTED_JSON)
        last = end
    out.append(text[last:])
    return "".join(out)


def _ws(text: str, i: int) -> int:
    return _WS.match(text, i).end()


def _ascii_lower(text: str) -> str:
    """`text` with its ASCII letters lowercased, nothing else: of the same length, so that
    positions found in it are positions in `text`, and the same as the pre-check's bytes."""
    return text.lower() if text.isascii() else text.encode("utf-8", "surrogatepass").lower().decode(
        "utf-8", "surrogatepass")


def _atoms(name: str) -> list[str | None]:
    """A name as its lowercased characters, with `_SEPARATOR` at each word break: `api_key`,
    `apiKey` and `API-KEY` give the same atoms."""
    atoms: list[str | None] = []
    for word in _WORD_BREAK.split(name.strip()):
        if word:
            atoms += [_SEPARATOR, *_ascii_lower(word)] if atoms else [*_ascii_lower(word)]
    return atoms


def _pattern(names: list[list[str | None]], backwards: bool = False) -> str:
    """One regex for many names, their common prefixes merged (an alternation of fifteen names
    tried at every key would cost more than the rest of the record). `backwards`: for the
    reversed UTF-8 bytes of a text (as `\\xNN` escapes, which a bytes pattern takes as bytes)."""

    def atom(a: str | None) -> str:
        if a is _SEPARATOR:
            return "[_-]?"
        if backwards and not a.isascii():
            return "".join(f"\\x{b:02x}" for b in reversed(a.encode()))
        return re.escape(a)

    root: dict = {}
    for atoms in names:
        node = root
        for a in reversed(atoms) if backwards else atoms:
            node = node.setdefault(atom(a), {})
        node[""] = {}

    def emit(node: dict) -> str:
        alternatives = [a + emit(child) for a, child in node.items() if a]
        if not alternatives:
            return ""
        body = alternatives[0] if len(alternatives) == 1 else f"(?:{'|'.join(alternatives)})"
        return f"(?:{body})?" if "" in node else body

    return emit(root)


def redact_raw(body, ends: Sequence[int], *, stream: bool, redactor: BodyRedactor) -> tuple[bytes, Sequence[int]]:
    """A raw (not content-encoded) body as the spool stores it: the values of secret members
    replaced, `ends` (where each piece of it ended) moved with the bytes. A body without a
    secret-looking key comes back as it is, after the cheap pre-check only: bytes, or a body
    still in pieces (see `suspect`), joined only when it holds such a key. A piece that ended
    inside a line that changed ends where that line now ends."""
    if not redactor.suspect(body):
        return body, ends
    body = bytes(body)
    text = body.decode("utf-8", "surrogateescape")
    new = redactor.event_stream(text) if stream else redactor.json(text)
    if new == text:
        return body, ends
    out = new.encode("utf-8", "surrogateescape")
    old_lines, new_lines = text.splitlines(keepends=True), new.splitlines(keepends=True)
    if len(old_lines) != len(new_lines):
        return out, [len(out)]  # (no line mapping: one piece)
    moved, at, old_at, new_at = [], 0, 0, 0
    for old, fresh in zip(old_lines, new_lines):
        old_end = old_at + len(old.encode("utf-8", "surrogateescape"))
        new_len = len(fresh.encode("utf-8", "surrogateescape"))
        while at < len(ends) and ends[at] <= old_end:
            offset = ends[at] - old_at
            if old != fresh:  # within a changed line: at most its end; at its end: its new end
                offset = new_len if ends[at] == old_end else min(offset, new_len)
            moved.append(new_at + offset)
            at += 1
        old_at, new_at = old_end, new_at + new_len
    moved += [len(out)] * (len(ends) - at)
    return out, moved

