"""The stream tee: the one piece of r4u-mitm that runs for every chunk of a traced stream."""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable


class Budget:
    """Bytes kept by all open taps together, at most `limit`. `kept` is only ever added to on
    the event loop (by taps), `released` only by the spool writer's thread once those bytes are
    stored: no lock on the hot path, and `kept - released` is what is held."""

    __slots__ = ("limit", "kept", "released")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = 0
        self.released = 0

    @property
    def used(self) -> int:
        return self.kept - self.released


class Tap:
    """A stream callable for mitmproxy (`flow.response.stream = tap`).

    It returns every piece unchanged, at once, and keeps a reference to it with its arrival time
    (monotonic; in an `array('d')`: 8 bytes a piece where a list of floats takes 32, as fast).
    All decoding happens later, once per exchange, off the event loop: the per-piece cost is an
    append and a clock read. Pieces beyond `limit` kept bytes, or beyond the shared `budget` of
    all open taps, are passed on but not kept (`truncated`). It never raises: an exception in a
    stream callable drops the piece for the client. If its own work fails (`error` says how,
    first failure only), it keeps nothing more and says `truncated`: the trace then holds the
    part before the failure and claims nothing about the rest, rather than a body with holes.
    """

    __slots__ = ("pieces", "times", "wire_bytes", "kept_bytes", "limit", "truncated", "ended_at", "error",
                 "budget", "_clock")

    def __init__(self, limit: int, budget: Budget | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.pieces: list[bytes] = []
        self.times = array("d")
        self.wire_bytes = 0
        self.kept_bytes = 0
        self.limit = limit
        self.truncated = False
        self.ended_at: float | None = None
        self.error: str | None = None
        self.budget = budget or Budget(limit)
        self._clock = clock

    def __call__(self, piece: bytes) -> bytes:
        try:
            if piece:
                size = len(piece)
                self.wire_bytes += size
                budget = self.budget
                if self.kept_bytes < self.limit and budget.kept - budget.released < budget.limit:
                    at = self._clock()
                    self.times.append(at)  # first: a clock's odd value fails before the pair is split
                    self.pieces.append(piece)
                    self.kept_bytes += size
                    budget.kept += size
                else:
                    self.truncated = True
            else:  # mitmproxy's end-of-body call
                self.ended_at = self._clock()
        except Exception as exc:  # noqa: BLE001 - the pass-through must survive anything
            try:
                if self.error is None:
                    self.error = f"{type(exc).__name__}: {exc}"[:200]
                if piece:
                    self.limit = -1  # keep nothing more: no holes in the kept body
                    self.truncated = True
            except Exception:  # noqa: BLE001
                pass
        return piece
