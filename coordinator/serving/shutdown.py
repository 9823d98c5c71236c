"""How `poe-serve serve` ends: on SIGTERM or SIGINT it drains, releases its workers and exits,
all within `--shutdown-timeout` seconds.

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
    return received[0]


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


def _exit_now(timeout: float) -> None:
    print(f"poe-serve: shutdown took longer than --shutdown-timeout {timeout:g}s (Ray did not answer); "
          "exiting without waiting for it", file=sys.stderr, flush=True)
    os._exit(0)
