import pytest

from r4u_mitm.pure.openai_url import alias
from r4u_mitm.pure.redact import REDACTED

AZURE = "https://contoso.openai.azure.com"


@pytest.mark.parametrize(("path", "op", "deployment", "version"), [
    ("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", "chat/completions", "gpt-4o",
     "2024-10-21"),
    ("/openai/deployments/my%20dep/completions?api-version=2024-02-01", "completions", "my dep", "2024-02-01"),
    ("/openai/deployments/embeddings/embeddings?api-version=2024-10-21", "embeddings", "embeddings", "2024-10-21"),
    ("/openai/deployments/dalle/images/generations?api-version=2024-10-21", "images/generations", "dalle",
     "2024-10-21"),
    ("/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21", "audio/transcriptions", "whisper",
     "2024-10-21"),
    ("/openai/responses?api-version=2025-04-01-preview", "responses", None, "2025-04-01-preview"),
    ("/openai/responses/resp_123/input_items?api-version=2025-04-01-preview", "responses/resp_123/input_items", None,
     "2025-04-01-preview"),
    ("/openai/v1/chat/completions", "chat/completions", None, None),
    ("/openai/v1/responses?api-version=preview", "responses", None, "preview"),
    ("/openai/v1/models/gpt-4o", "models/gpt-4o", None, None),
    ("/openai/models?API-Version=2024-10-21", "models", None, "2024-10-21"),
])
def test_azure_paths_become_openai_operations(path, op, deployment, version):
    assert alias("azure_openai", AZURE + path) == {
        "url": f"https://api.openai.com/v1/{op}", "upstream_url": AZURE + path,
        "azure_deployment": deployment, "api_version": version,
    }


@pytest.mark.parametrize("path", [
    "/openai/deployments?api-version=2022-12-01",  # lists deployments: Azure's own call
    "/openai/deployments/gpt-4o/extensions/chat/completions?api-version=2023-08-01-preview",  # old "On Your Data"
    "/openai/operations/images/abc?api-version=2023-06-01-preview",
    "/openai/deployments/gpt-4o/chat/completions/x/y",
    "/openai/deployments/gpt-4o",
    "/chat/completions",  # not under /openai: not Azure OpenAI's API
    "/openai/v1",
    "/",
])
def test_azure_paths_of_no_openai_operation_keep_the_real_url(path):
    assert alias("azure_openai", AZURE + path) is None


def test_azure_secrets_in_the_query_stay_out_of_both_urls():
    url = AZURE + "/openai/deployments/d/chat/completions?api-version=2024-10-21&api-key=SEKRIT"
    fields = alias("azure_openai", url)
    assert fields["url"] == "https://api.openai.com/v1/chat/completions"
    assert fields["upstream_url"] == url.replace("SEKRIT", REDACTED)
    assert fields["api_version"] == "2024-10-21"


@pytest.mark.parametrize(("url", "op"), [
    ("http://localhost:11434/v1/chat/completions", "chat/completions"),
    ("http://localhost:11434/v1/embeddings", "embeddings"),
    ("http://localhost:11434/v1/models/llama3.2:3b", "models/llama3.2:3b"),
    ("http://127.0.0.1:8000/v1/completions", "completions"),
    ("http://127.0.0.1:8000/v1/responses/", "responses"),
    ("https://openrouter.ai/api/v1/chat/completions", "chat/completions"),
    ("https://api.groq.com/openai/v1/responses", "responses"),
    ("https://generativelanguage.googleapis.com/v1beta/openai/chat/completions", "chat/completions"),
    ("https://api.deepseek.com/chat/completions", "chat/completions"),
    ("https://gw.example/v1/acct/gateway/openai/chat/completions", "chat/completions"),
    ("https://x.services.ai.azure.com/models/chat/completions?api-version=2024-05-01-preview", "chat/completions"),
    ("https://llm.internal/v1/chat/completions/chatcmpl-1/messages", "chat/completions/chatcmpl-1/messages"),
    ("https://llm.internal/v1/moderations", "moderations"),
    ("https://llm.internal/v1/audio/speech", "audio/speech"),
])
def test_compatible_paths_become_openai_operations_after_any_prefix(url, op):
    fields = alias("openai_compatible", url)
    assert fields == {"url": f"https://api.openai.com/v1/{op}", "upstream_url": url}


@pytest.mark.parametrize("url", [
    "http://localhost:11434/api/chat",  # Ollama's own API: not OpenAI's wire format
    "http://localhost:11434/api/generate",
    "http://localhost:11434/api/tags",
    "http://localhost:8000/v1/chat",
    "http://localhost:8000/v1/completions/extra/parts",
    "http://localhost:8000/v1/images",
    "http://localhost:8000/",
])
def test_compatible_paths_of_no_openai_operation_keep_the_real_url(url):
    assert alias("openai_compatible", url) is None


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_other_providers_keep_their_url(provider):
    assert alias(provider, "https://api.openai.com/v1/chat/completions") is None
    assert alias(provider, AZURE + "/openai/deployments/d/chat/completions?api-version=1") is None
