"""hosts.py: host rules → provider (parse_host_rules, HostRules.match)."""

from __future__ import annotations

import pytest

from r4u_mitm.pure.hosts import DEFAULT_HOSTS, infer_provider, parse_host_rules


def test_default_hosts():
    rules = parse_host_rules(DEFAULT_HOSTS)
    assert rules.match("api.openai.com", 443) == "openai"
    assert rules.match("myres.openai.azure.com", 443) == "azure_openai"
    assert rules.match("eastus.myres.openai.azure.com") == "azure_openai"
    assert rules.match("openai.azure.com", 443) is None
    assert rules.match("api.anthropic.com", 443) == "anthropic"
    assert rules.match("api.anthropic.com", 8443) == "anthropic"
    assert rules.match("console.anthropic.com", 443) is None
    assert rules.match("example.com", 443) is None


@pytest.mark.parametrize(
    "entry, provider",
    [
        ("api.openai.com", "openai"),
        ("API.OpenAI.com", "openai"),
        ("*.openai.azure.com", "azure_openai"),
        ("myres.openai.azure.com", "azure_openai"),
        ("api.anthropic.com", "anthropic"),
        ("localhost:8000", "openai_compatible"),
        ("api.groq.com", "openai_compatible"),
        ("*.example.com", "openai_compatible"),
        ("openai.azure.com", "openai_compatible"),  # not an Azure resource host
        ("api.openai.com.evil.com", "openai_compatible"),
    ],
)
def test_provider_inferred_from_host(entry, provider):
    (rule,) = parse_host_rules([entry]).rules
    assert rule.provider == provider


@pytest.mark.parametrize(
    "host, provider",
    [
        ("api.openai.com", "openai"),
        ("myres.openai.azure.com", "azure_openai"),
        ("api.anthropic.com", "anthropic"),
        ("openai.azure.com", "openai_compatible"),
        ("localhost", "openai_compatible"),
    ],
)
def test_provider_inferred_from_a_request_host(host, provider):
    # what the content view falls back on for a flow the addon did not annotate
    assert infer_provider(host) == provider


def test_explicit_provider_wins_over_inference_and_is_case_insensitive():
    rules = parse_host_rules(["api.openai.com=openai_compatible", "llm.corp=Anthropic"])
    assert rules.match("api.openai.com") == "openai_compatible"
    assert rules.match("llm.corp") == "anthropic"


def test_match_is_case_insensitive_and_ignores_trailing_dot():
    rules = parse_host_rules(["Api.OpenAI.com", "*.Example.COM"])
    assert rules.match("API.OPENAI.COM", 443) == "openai"
    assert rules.match("api.openai.com.", 443) == "openai"
    assert rules.match("A.B.example.com") == "openai_compatible"


def test_wildcards():
    rules = parse_host_rules(["*.x.com=anthropic"])
    assert rules.match("a.x.com") == "anthropic"
    assert rules.match("a.b.x.com") == "anthropic"
    assert rules.match("x.com") is None
    assert rules.match("ax.com") is None
    assert rules.match("a.x.com.org") is None


def test_ports():
    rules = parse_host_rules(["localhost:8000=openai_compatible", "api.openai.com"])
    assert rules.match("localhost", 8000) == "openai_compatible"
    assert rules.match("localhost", 8001) is None
    assert rules.match("localhost") is None  # a port rule needs that port
    assert rules.match("api.openai.com", 443) == "openai"  # no port: any port
    assert rules.match("api.openai.com", 8443) == "openai"
    assert rules.match("api.openai.com") == "openai"


def test_wildcard_with_port():
    rules = parse_host_rules(["*.corp:8443=openai_compatible"])
    assert rules.match("llm.corp", 8443) == "openai_compatible"
    assert rules.match("llm.corp", 443) is None


def test_ip_addresses():
    rules = parse_host_rules(["127.0.0.1:8080", "[::1]:9000=anthropic", "[2001:db8::1]"])
    assert rules.match("127.0.0.1", 8080) == "openai_compatible"
    assert rules.match("127.0.0.1", 80) is None
    assert rules.match("::1", 9000) == "anthropic"
    assert rules.match("[::1]", 9000) == "anthropic"
    assert rules.match("0:0:0:0:0:0:0:1", 9000) == "anthropic"
    assert rules.match("2001:db8:0::1", 443) == "openai_compatible"


def test_internationalized_names():
    rules = parse_host_rules(["llm.bücher.example=anthropic"])
    assert rules.rules[0].host == "llm.xn--bcher-kva.example"
    assert rules.match("llm.xn--bcher-kva.example") == "anthropic"
    assert rules.match("LLM.Bücher.example") == "anthropic"


def test_precedence_exact_beats_wildcard_longer_wildcard_beats_shorter_port_beats_none():
    rules = parse_host_rules(
        [
            "*.openai.azure.com",
            "special.openai.azure.com=openai_compatible",
            "*.eu.openai.azure.com=anthropic",
            "special.openai.azure.com:8443=openai",
        ]
    )
    assert rules.match("a.openai.azure.com") == "azure_openai"
    assert rules.match("special.openai.azure.com", 443) == "openai_compatible"
    assert rules.match("special.openai.azure.com", 8443) == "openai"
    assert rules.match("res.eu.openai.azure.com") == "anthropic"


def test_duplicates_are_fine_conflicts_are_not():
    assert len(parse_host_rules(["api.openai.com", "API.openai.com=openai"])) == 1
    with pytest.raises(ValueError, match="conflicts"):
        parse_host_rules(["api.openai.com", "api.openai.com=anthropic"])


def test_a_lone_string_is_one_entry():
    assert parse_host_rules("api.openai.com").match("api.openai.com") == "openai"


@pytest.mark.parametrize(
    "entry, words",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("api.openai.com=", "missing provider"),
        ("api.openai.com=gemini", "unknown provider 'gemini'"),
        ("*", "api"),  # any message is fine, as long as it names the entry (checked below)
        ("*.", "not a host"),
        ("a.*.com", "wildcard"),
        ("*x.com", "wildcard"),
        ("**.x.com", "wildcard"),
        ("x.*", "wildcard"),
        ("api.openai.com:0", "port"),
        ("api.openai.com:65536", "port"),
        ("api.openai.com:http", "port"),
        ("api.openai.com:", "port"),
        ("https://api.openai.com", "port"),
        ("api..openai.com", "not a host"),
        ("api openai.com", "not a host"),
        ("[::1", "IPv6"),
        ("[::1]x", "after"),
    ],
)
def test_invalid_entries(entry, words):
    with pytest.raises(ValueError) as info:
        parse_host_rules(["api.openai.com", entry])
    message = str(info.value)
    assert repr(entry) in message or "empty" in message
    if words != "api":
        assert words in message


def test_invalid_entry_that_is_not_a_string():
    with pytest.raises(ValueError):
        parse_host_rules([None])  # type: ignore[list-item]


def test_match_garbage_hosts():
    rules = parse_host_rules(DEFAULT_HOSTS)
    for host in ("", ".", "[", "]", ":::", "[zz::1]", "*.openai.azure.com"):
        assert rules.match(host, 443) in (None, "azure_openai")
