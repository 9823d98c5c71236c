"""How `poe-serve serve` ends: on SIGTERM or SIGINT it drains, releases its workers and exits,
all within `--shutdown-timeout` seconds; a second signal exits at once, saying so.

While the server is still starting (`interruptible_startup`), the first signal interrupts the
start (KeyboardInterrupt in the main thread: the caller releases what has started, within the
same timeout), and a second one exits at once.

The server stops admitting at once (health NOT_SERVING, new requests UNAVAILABLE) and lets the
requests in flight finish; the last RELEASE_RESERVE_S of the timeout (at most half of it) is kept
for releasing the workers and Ray. Ray may not answer then: under systemd's default KillMode, or
`kill -- -PGID`, Ray's own processes get the same signal, and its client then waits about a
minute for them. So a watchdog ends the process when the timeout is up, whatever is still
waiting. It knows the server's drain and a release callable, nothing of gRPC or Ray.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable

RELEASE_RESERVE_S = 5.0
SIGNAL_POLL_S = 0.1


def wait_for_signal() -> str:
    """Block until SIGTERM or SIGINT; returns the signal's name."""
    received: list[str] = []
    stopped = threading.Event()

    def handle(signum, _frame):
        received.append(signal.Signals(signum).name)
        stopped.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)
    # Wake up now and then: a signal the kernel hands to another thread (gRPC's, Ray's) does not
    # interrupt this thread's wait, and Python runs the handler only when this thread runs.
    while not stopped.wait(SIGNAL_POLL_S):
        pass
    _exit_on_next_signal()
    return received[0]


@contextmanager
def interruptible_startup(timeout: float):
    """While the body runs, SIGINT or SIGTERM raises KeyboardInterrupt: the caller releases what
    started (`release_after_interrupt`), and the process exits with status 130 within `timeout`
    whatever still waits; a second signal exits at once. The previous handlers come back when the
    body ends normally."""
    def interrupt(signum, _frame):
        print(f"poe-serve: interrupted while starting; releasing what started (up to {timeout:g}s; "
              "interrupt again to exit at once)", file=sys.stderr, flush=True)
        _exit_on_next_signal()
        watchdog = threading.Timer(timeout, _exit_now, args=(timeout, 130))
        watchdog.daemon = True
        watchdog.start()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield  # an exception leaves the handlers as they are: a signal now exits at once
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def release_after_interrupt(release: Callable[[], None]) -> None:
    """An interrupted start: `release()` what started, then exit with status 130."""
    try:
        release()
    finally:
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(130)  # not the interpreter's exit: Ray's threads may still be winding down


def _exit_on_next_signal() -> None:
    def exit_at_once(signum, _frame):
        print(f"poe-serve: second {signal.Signals(signum).name}: exiting at once", file=sys.stderr, flush=True)
        os._exit(130)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, exit_at_once)


def shut_down(server, release: Callable[[], None], timeout: float) -> None:
    """Drain `server`, then call `release()`; the process exits (status 0) when `timeout` is up
    even if either is still waiting."""
    deadline = time.monotonic() + timeout
    watchdog = threading.Timer(timeout, _exit_now, args=(timeout,))
    watchdog.daemon = True  # it must outlive a hanging release, and Ray's exit handlers after it
    watchdog.start()
    left = server.drain(deadline - min(RELEASE_RESERVE_S, timeout / 2))
    if left:
        print(f"poe-serve: {left} request(s) still running at the drain deadline were cancelled", flush=True)
    release()


def _exit_now(timeout: float, status: int = 0) -> None:
    print(f"poe-serve: shutdown took longer than --shutdown-timeout {timeout:g}s (Ray did not answer); "
          "exiting without waiting for it", file=sys.stderr, flush=True)
    os._exit(status)
