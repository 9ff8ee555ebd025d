"""The OpenAI API URL of an exchange with a host that speaks OpenAI's wire format (Azure OpenAI,
an OpenAI-compatible server).

R4U picks its parser by the host in `metadata.url` and knows only `openai.com` for this format:
an Azure or compatible URL gets no structured trace. Sent as `https://api.openai.com/v1/<op>`,
the same operation is parsed as OpenAI's; the real URL goes beside it. Pure: a URL in, fields out.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit

from r4u_mitm.pure.hosts import AZURE_OPENAI, OPENAI_COMPATIBLE
from r4u_mitm.pure.redact import redact_url

OPENAI_API = "https://api.openai.com/v1/"

# OpenAI's operations: what R4U's OpenAI parser reads (chat, completions, Responses, embeddings)
# and the calls beside them (models, moderations, images, audio). A compatible server may put any
# prefix before them (`/v1`, `/api/v1`, `/v1beta/openai`, a gateway's): they are matched at the end.
_OPERATION = re.compile(
    r"/(chat/completions(?:/[^/]+(?:/messages)?)?|completions|responses(?:/[^/]+(?:/cancel|/input_items)?)?"
    r"|embeddings|models(?:/[^/]+)?|moderations|images/(?:generations|edits|variations)"
    r"|audio/(?:speech|transcriptions|translations))/?$"
)
# Azure: /openai/deployments/<deployment>/<op>, /openai/v1/<op>, /openai/<op> (Responses, models).
_AZURE_PATH = re.compile(r"/openai(?:/deployments/(?P<deployment>[^/]+)|/v1)?(?P<op>/.+)")


def alias(provider: str, url: str) -> dict | None:
    """`metadata` fields for an exchange with `url`: `url` (OpenAI's URL of the operation),
    `upstream_url` (the real one, secrets redacted) and, for Azure, `azure_deployment` and
    `api_version` (null when the URL has none). None when the provider is not an OpenAI-format
    host other than OpenAI, or the path is no OpenAI operation: the real URL is then the url."""
    if provider not in (AZURE_OPENAI, OPENAI_COMPATIBLE):
        return None
    parts = urlsplit(url)
    path, deployment = parts.path, None
    if provider == AZURE_OPENAI:
        found = _AZURE_PATH.fullmatch(path)
        if found is None:
            return None
        path, deployment = found["op"], found["deployment"]
    op = _OPERATION.search(path)
    if op is None or (provider == AZURE_OPENAI and op.start() != 0):
        return None
    fields = {"url": OPENAI_API + op[1], "upstream_url": redact_url(url)}
    if provider == AZURE_OPENAI:
        version = next((v for k, v in parse_qsl(parts.query) if k.lower() == "api-version"), None)
        fields.update(azure_deployment=unquote(deployment) if deployment else None, api_version=version)
    return fields
