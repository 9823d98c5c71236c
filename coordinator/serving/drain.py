"""Admission for a server that may be shutting down: requests in flight, and the drain.

`enter()` counts a request in (and `leave()` out) while its handler runs; once `start()` is
called (on SIGTERM) `enter()` refuses new ones, and `wait(deadline)` returns when the last one in
flight is done or the deadline passes. It knows neither gRPC nor the model.
"""

from __future__ import annotations

import threading
import time


class Drain:
    def __init__(self):
        self._changed = threading.Condition()
        self._in_flight = 0
        self.draining = False

    def enter(self) -> bool:
        """Count one more request in flight; False (and nothing counted) once draining started."""
        with self._changed:
            if self.draining:
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        with self._changed:
            assert self._in_flight > 0, "leave() without a matching enter()"
            self._in_flight -= 1
            self._changed.notify_all()

    def start(self) -> None:
        with self._changed:
            self.draining = True

    def wait(self, deadline: float) -> int:
        """Wait until nothing is in flight or `deadline` (time.monotonic()) passes; returns what is left."""
        with self._changed:
            self._changed.wait_for(lambda: self._in_flight == 0, timeout=max(deadline - time.monotonic(), 0.0))
            return self._in_flight
