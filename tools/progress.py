"""A one-line terminal progress bar for long jobs (checkpoint writing, training, benchmarks).

It writes to stderr and redraws in place when stderr is a terminal, or prints a line every
10% otherwise (CI logs). It knows nothing about what is being counted.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: float, label: str, unit: str = "", stream=None):
        self.total, self.label, self.unit = max(total, 1e-9), label, unit
        self.stream = stream or sys.stderr
        self.done = 0.0
        self.started = time.perf_counter()
        self._last_decile = -1
        self._tty = getattr(self.stream, "isatty", lambda: False)()

    def update(self, amount: float = 1, note: str = "") -> None:
        self.done = min(self.done + amount, self.total)
        frac = self.done / self.total
        elapsed = time.perf_counter() - self.started
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(frac * 30)
        line = f"{self.label} [{bar:<30}] {frac:6.1%} {self.done:.0f}/{self.total:.0f}{self.unit} {elapsed:.0f}s eta {eta:.0f}s {note}"
        if self._tty:
            self.stream.write("\r" + line[:160].ljust(160))
            if frac >= 1:
                self.stream.write("\n")
        elif int(frac * 10) > self._last_decile:
            self._last_decile = int(frac * 10)
            self.stream.write(line.rstrip() + "\n")
        self.stream.flush()
