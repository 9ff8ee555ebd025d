"""The pure parts both processes use: bytes → SSE events → dialect summaries → the R4U record,
host rules, redaction. No I/O, no clocks, no mitmproxy."""
