"""Which hosts are LLM APIs, and which provider each one is.

Pure: no I/O, no mitmproxy, no clock. The proxy (addon, backfill) picks the flows it traces with
``parse_host_rules(...).match(host, port)``.

Rules: ``host``, ``host=provider``, ``*.suffix``, ``host:port``, ``[v6]:port``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ANTHROPIC",
    "AZURE_OPENAI",
    "DEFAULT_HOSTS",
    "OPENAI",
    "OPENAI_COMPATIBLE",
    "PROVIDERS",
    "HostRule",
    "HostRules",
    "infer_provider",
    "parse_host_rules",
]

OPENAI = "openai"
AZURE_OPENAI = "azure_openai"
ANTHROPIC = "anthropic"
OPENAI_COMPATIBLE = "openai_compatible"
PROVIDERS = (OPENAI, AZURE_OPENAI, ANTHROPIC, OPENAI_COMPATIBLE)

DEFAULT_HOSTS = ("api.openai.com", "*.openai.azure.com", "api.anthropic.com")


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


def infer_provider(host: str) -> str:
    """The provider a rule's host (or a request's, lower-case) names when no ``=provider`` says."""
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
    return HostRule(host, port, provider or infer_provider(host), entry)


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
