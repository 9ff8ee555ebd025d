"""Wake-ups from the proxies to the deliverer of a spool: one datagram on a Unix socket whose
address is derived from the spool's real path (Linux: the abstract namespace; elsewhere a short
path in the temp dir). `b"w"`: exchanges were added; `b"f"`: flush (try everything now).
Sending never blocks and never fails the proxy: a lost wake-up is covered by a slow poll."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import tempfile
from pathlib import Path

ADDED = b"w"
FLUSH = b"f"


def address(spool: str | os.PathLike) -> str | bytes:
    key = hashlib.sha1(str(Path(spool).expanduser().resolve()).encode()).hexdigest()[:20]
    if sys.platform.startswith("linux"):
        return b"\0r4u-mitm-" + key.encode()
    return os.path.join(tempfile.gettempdir(), f"r4u-mitm-{key}.sock")


class Sender:
    """A proxy's side: one unbound datagram socket per spool."""

    def __init__(self, spool: str | os.PathLike) -> None:
        self.address = address(spool)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def send(self, message: bytes = ADDED) -> None:
        try:
            self._sock.sendto(message, self.address)
        except OSError:  # no deliverer listening (yet), or its queue is full: it polls anyway
            pass

    def close(self) -> None:
        self._sock.close()


def bind(spool: str | os.PathLike) -> socket.socket:
    """The deliverer's side (it holds the spool's lock, so a stale socket file is its own)."""
    addr = address(spool)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.bind(addr)
    except OSError:
        if isinstance(addr, bytes):
            sock.close()
            raise
        os.unlink(addr)
        sock.bind(addr)
    return sock
