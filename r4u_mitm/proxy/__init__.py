"""What runs inside mitmproxy, beside `addon.py`: the stream tee, freezing a flow, the spool
writer and the deliverer's supervision, mitmweb's event-stream view. Nothing here decodes,
parses or posts a body."""
