"""A background thread that owns the engine, so concurrent callers share its batches.

Callers `submit` a request and read `RequestHandle.next_event()` (new tokens as they are
committed, then the end); `abort` drops a request and frees its KV on every worker. Requests
join the running batch between steps (continuous batching). If a step fails, only the requests
in that step fail; the loop keeps serving. Its `observers` (coordinator/serving/metrics.py, one per
front that counts) are told of each submit and step.

If anything else the loop runs raises (scheduling, recovery from a lost worker), the engine's
state is unknown, so the loop does not restart: it fails every request not yet ended (queued or
running) with `EngineLoopDown`, refuses new ones, and reports the failure to its listeners (the
server's health turns NOT_SERVING; the process is meant to be replaced). No wait on the loop
outlives it: every wait polls the loop's liveness. It knows the engine, not gRPC.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from coordinator.core.engine import Engine
from coordinator.core.sequence import Sequence

log = logging.getLogger("poe_serve.engine_loop")
LIVENESS_POLL_S = 0.5  # how often a waiter checks that the loop can still answer it


class QueueFull(RuntimeError):
    """More requests are waiting than the configured queue allows."""


class EngineLoopDown(RuntimeError):
    """The engine loop was stopped, or died of an unexpected error: no request will run."""


def _down(failure: EngineLoopDown) -> EngineLoopDown:
    """The loop's failure for one caller: its own exception (and traceback), the same cause."""
    down = EngineLoopDown(str(failure))
    down.__cause__, down.__suppress_context__ = failure.__cause__, True
    return down


@dataclass
class Event:
    tokens: list[int]  # newly committed tokens (may be empty)
    stages_used: list[int] = field(default_factory=list)  # WAND exit stages of those tokens
    logprobs: list[float] = field(default_factory=list)  # their log-probs, when the request asks
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)  # and alternatives
    done: bool = False
    error: BaseException | None = None


class RequestHandle:
    def __init__(self, request, loop: "EngineLoop"):
        self.request = request
        self.events: queue.Queue[Event] = queue.Queue()
        self.seq: Sequence | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.cancelled = False
        self._loop = loop
        self._sent = 0  # committed tokens already delivered

    def next_event(self, timeout: float | None = None) -> Event:
        """The next event. Raises TimeoutError after `timeout` seconds (None: no limit), and
        EngineLoopDown as soon as the loop can no longer send one."""
        return self._loop.wait_for(lambda seconds: self.events.get(timeout=seconds), timeout)

    def result(self, timeout: float | None = None) -> Sequence:
        """Block until the request ends; returns its sequence or raises its error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            event = self.next_event(None if deadline is None else max(deadline - time.monotonic(), 0.0))
            if event.error is not None:
                raise event.error
            if event.done:
                return self.seq


class EngineLoop:
    def __init__(self, engine: Engine, max_queue: int = 256):
        self.engine = engine
        self.max_queue = max_queue  # waiting requests beyond which submit() refuses
        self.listeners: list[Callable[[], None]] = []  # called on the loop thread when failure() or stages down change
        self._inbox: queue.Queue = queue.Queue()
        self._handles: dict[int, RequestHandle] = {}  # seq_id -> handle, for the sequences in the engine
        # One lock makes admission atomic (the queue check and the enqueue) and orders every
        # handle's last event against the loop's failure.
        self._lock = threading.Lock()
        self._num_inbox_adds = 0  # submitted requests the loop has not yet handed to the engine
        self._outstanding: set[RequestHandle] = set()  # submitted, not yet ended
        self._failure: EngineLoopDown | None = None
        self._num_stages_down = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poe-engine-loop", daemon=True)
        self.observers: list = []  # each told of every submit and step (coordinator/serving/metrics.py)

    def stop(self) -> None:
        """End the thread after its current step; requests not yet ended fail with EngineLoopDown."""
        with self._lock:
            self._failure = self._failure or EngineLoopDown("the engine loop was stopped; no request will run")
        self._stop.set()
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._fail_outstanding()

    def failure(self) -> EngineLoopDown | None:
        """Why the loop runs no more requests (stopped, died), or None while it serves."""
        with self._lock:
            return self._failure_locked()

    def _failure_locked(self) -> EngineLoopDown | None:
        if self._failure is None and self._thread.ident is not None and not self._thread.is_alive():
            self._failure = EngineLoopDown("the engine loop thread ended unexpectedly; no request will run")
        return self._failure

    def wait_for(self, get: Callable[[float], object], timeout: float | None = None):
        """`get(seconds)` waits for a value (raising queue.Empty or TimeoutError when none came).
        Waits in short slices and raises EngineLoopDown once the loop can no longer deliver one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = LIVENESS_POLL_S if deadline is None else min(LIVENESS_POLL_S, max(deadline - time.monotonic(), 0.0))
            try:
                return get(left)
            except (queue.Empty, TimeoutError):
                pass
            failure = self.failure()
            if failure is not None:
                try:
                    return get(0.0)  # what the loop sent just before it went
                except (queue.Empty, TimeoutError):
                    raise _down(failure)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no answer from the engine loop within {timeout}s")

    # ---- called from any thread -------------------------------------------------------------
    def submit(self, request, limit_queue: bool = True) -> RequestHandle:
        """Queue a request for the next step. With limit_queue, refuse when the queue is full."""
        handle = RequestHandle(request, self)
        with self._lock:  # checked and enqueued at once: no two callers can take the last place
            if self._failure_locked() is not None:
                raise _down(self._failure)
            if limit_queue and len(self.engine.waiting) + self._num_inbox_adds >= self.max_queue:
                raise QueueFull(f"server overloaded: {self.max_queue} requests already waiting; retry later")
            self._num_inbox_adds += 1
            self._outstanding.add(handle)
            for observer in self.observers:
                observer.on_submit(handle)  # before any event can reach the handle
            self._inbox.put(("add", handle))
        self._ensure_started()
        return handle

    def abort(self, handle: RequestHandle) -> None:
        handle.cancelled = True
        self._inbox.put(("abort", handle))

    def call_in_loop(self, fn):
        """Run fn() on the loop thread between two steps (e.g. scaling a stage); returns its result."""
        future = Future()
        with self._lock:
            if self._failure_locked() is not None:
                raise _down(self._failure)
            self._inbox.put(("call", (fn, future)))
        self._ensure_started()
        return self.wait_for(lambda seconds: future.result(timeout=seconds))

    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread.ident is None and self._failure is None:  # started once, with the first request
                self._thread.start()

    def _end(self, handle: RequestHandle, event: Event) -> None:
        """Send an event unless the handle has ended; a done event ends it."""
        with self._lock:
            if handle not in self._outstanding:
                return
            if event.done:
                self._outstanding.discard(handle)
            handle.events.put(event)

    def _fail_outstanding(self) -> None:
        """Every handle not yet ended, and every queued call, fails with the loop's failure."""
        with self._lock:
            failure, handles = self._failure, list(self._outstanding)
            self._outstanding.clear()
            for handle in handles:
                handle.events.put(Event([], done=True, error=_down(failure)))
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[0] == "call":
                item[1][1].set_exception(_down(failure))

    def _notify(self) -> None:
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:  # a listener's bug must not take the loop down with it
                log.exception("engine loop listener %r failed", listener)

    # ---- the loop thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_work())
                if self.engine.has_work():
                    self._step()
        except BaseException as exc:  # anything at all: the waiters must hear of it
            log.exception("the engine loop died; failing every outstanding request")
            down = EngineLoopDown("the engine loop stopped after an unexpected error (the server log has it); "
                                  "no request will run")
            down.__cause__ = exc
            with self._lock:
                self._failure = self._failure or down
        self._fail_outstanding()
        self._notify()

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            action, handle = item
            if action == "add":
                self._add(handle)
            elif action == "call":
                fn, future = handle
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            elif handle.seq is not None and not handle.seq.finished:
                self.engine.abort(handle.seq, "cancelled")
                self._finish(handle)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                item = None

    def _add(self, handle: RequestHandle) -> None:
        with self._lock:  # the request moves from the inbox to engine.waiting at once (see submit)
            self._num_inbox_adds -= 1
            if handle.cancelled:  # aborted before it reached the engine; its caller may still be waiting
                seq, error = None, None
            else:
                try:
                    seq, error = self.engine.add(handle.request), None
                except Exception as exc:  # e.g. a request larger than any worker's KV cache
                    seq, error = None, exc
        if seq is None:
            self._end(handle, Event([], done=True, error=error))
            return
        handle.seq = seq
        self._handles[seq.seq_id] = handle

    def _step(self) -> None:
        started = time.perf_counter()
        seqs = self.engine.step()
        for observer in self.observers:
            observer.on_step(started, seqs)
        for seq in seqs:
            handle = self._handles.get(seq.seq_id)
            if handle is not None:
                self._deliver(handle)
        if len(self.engine.stages_down) != self._num_stages_down:
            self._num_stages_down = len(self.engine.stages_down)
            self._notify()

    def _deliver(self, handle: RequestHandle) -> None:
        seq = handle.seq
        if seq.error is not None:
            self._handles.pop(seq.seq_id, None)
            self._end(handle, Event([], done=True, error=seq.error))
            return
        new = seq.new_tokens[handle._sent :]
        if new and handle.first_token_at is None:
            handle.first_token_at = time.perf_counter()
        if new or seq.finished:
            sent = slice(handle._sent, handle._sent + len(new))
            handle._sent += len(new)
            self._end(handle, Event(new, seq.stages_used[sent], done=seq.finished, logprobs=seq.logprobs[sent],
                                    top_logprobs=seq.top_logprobs[sent]))
        if seq.finished:
            self._handles.pop(seq.seq_id, None)

    def _finish(self, handle: RequestHandle) -> None:
        self._handles.pop(handle.seq.seq_id, None)
        self._end(handle, Event([], done=True))
