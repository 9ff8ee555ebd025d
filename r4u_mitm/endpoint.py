"""R4U's address and TLS: the checks the proxy runs on `r4u_api_url` and `r4u_ca_file` before
it accepts them, and what the deliverer connects with. Shared by both processes; no I/O beyond
reading the CA file."""

from __future__ import annotations

import re
import ssl
from urllib.parse import urlsplit

_USERINFO = re.compile(r"^([^:/?#]*:)?//[^/?#]*@")  # user:password@ in a URL


def traces_urls(api_url: str) -> tuple[str, str, str]:
    """`(base, post_url, probe_url)` for a base URL given with or without a trailing `/v1`: R4U is
    probed with `GET /health`, which reads nothing stored."""
    base = api_url.strip().rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3].rstrip("/")
    return base, f"{base}/v1/http-traces", f"{base}/health"


class SetupError(ValueError):
    """Delivery cannot work with these settings: `setting` ("api_url" or "ca_file") names the
    one at fault, the message says why."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def safe_url(url: str) -> str:
    """The URL without any user:password in it (for logs and errors; a malformed URL too)."""
    return _USERINFO.sub(r"\1//", url, count=1)


def check_api_url(api_url: str) -> None:
    """R4U's base URL must be absolute http(s), with a host and a valid port (else SetupError)."""
    shown = repr(safe_url(api_url))
    try:
        parts = urlsplit(api_url)
    except ValueError as exc:  # e.g. an unbalanced [ in the host
        raise SetupError("api_url", f"invalid URL {shown}: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise SetupError("api_url", f"must be an http:// or https:// URL, not {shown}")
    if not parts.hostname:
        raise SetupError("api_url", f"no host in {shown}")
    try:
        parts.port
    except ValueError:
        raise SetupError("api_url", f"invalid port in {shown}") from None


def ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """Verify R4U's certificate with `ca_file`, else the system's store (certifi's when the
    system has none). Never unverified. A `ca_file` that cannot be read or holds no PEM
    certificate is a SetupError."""
    if ca_file:
        try:
            return ssl.create_default_context(cafile=ca_file)
        except ssl.SSLError as exc:  # before OSError: it is one
            reason = str(exc.strerror or exc).split(" (_ssl.c:")[0]
            raise SetupError("ca_file", f"{ca_file} is not a PEM CA bundle: {reason}") from None
        except OSError as exc:
            raise SetupError("ca_file", f"cannot read {ca_file}: {exc.strerror or exc}") from None
    context = ssl.create_default_context()
    if not context.cert_store_stats().get("x509_ca"):
        try:
            import certifi

            context.load_verify_locations(certifi.where())
        except (ImportError, OSError):
            pass
    return context
