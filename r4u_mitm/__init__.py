"""r4u-mitm: trace LLM API traffic through mitmproxy into R4U."""
