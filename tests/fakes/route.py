"""Test-only mitmproxy addon: send every upstream connection for a remote host to a local fake,
keeping the flow's URL (https://api.openai.com/...), as a test without internet needs.
Connections to local addresses go where they were meant to."""

from mitmproxy import ctx


class Route:
    def load(self, loader):
        loader.add_option("fake_upstream", str, "", "host:port that every upstream connection goes to")

    def server_connect(self, data):
        if ctx.options.fake_upstream and data.server.address[0] not in ("127.0.0.1", "localhost", "::1"):
            host, port = ctx.options.fake_upstream.rsplit(":", 1)
            data.server.address = (host, int(port))


addons = [Route()]
