"""A background thread that owns the engine, so concurrent callers share its batches.

Callers `submit` a request and read `RequestHandle.events` (new tokens as they are committed,
then the end); `abort` drops a request and frees its KV on every worker. Requests join the
running batch between steps (continuous batching). If a step fails, only the requests in that
step fail; the loop keeps serving. An optional `observer` (coordinator/metrics.py) is told of
each submit and step. It knows the engine, not gRPC.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from .engine import Engine
from .sequence import Sequence


class QueueFull(RuntimeError):
    """More requests are waiting than the configured queue allows."""


@dataclass
class Event:
    tokens: list[int]  # newly committed tokens (may be empty)
    stages_used: list[int] = field(default_factory=list)  # WAND exit stages of those tokens
    done: bool = False
    error: BaseException | None = None


class RequestHandle:
    def __init__(self, request):
        self.request = request
        self.events: queue.Queue[Event] = queue.Queue()
        self.seq: Sequence | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.cancelled = False
        self._sent = 0  # committed tokens already delivered

    def result(self, timeout: float | None = None) -> Sequence:
        """Block until the request ends; returns its sequence or raises its error."""
        while True:
            event = self.events.get(timeout=timeout)
            if event.error is not None:
                raise event.error
            if event.done:
                return self.seq


class EngineLoop:
    def __init__(self, engine: Engine, max_queue: int = 256):
        self.engine = engine
        self.max_queue = max_queue  # waiting requests beyond which submit() refuses
        self._inbox: queue.Queue = queue.Queue()
        self._handles: dict[int, RequestHandle] = {}  # seq_id -> handle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poe-engine-loop", daemon=True)
        self._start_lock = threading.Lock()  # the thread starts with the first request
        self.observer = None  # metrics (coordinator/metrics.py): told of each submit and step; None: none

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # ---- called from any thread -------------------------------------------------------------
    def submit(self, request, limit_queue: bool = True) -> RequestHandle:
        """Queue a request for the next step. With limit_queue, refuse when the queue is full."""
        if limit_queue and len(self.engine.waiting) + self._inbox.qsize() >= self.max_queue:
            raise QueueFull(f"server overloaded: {self.max_queue} requests already waiting; retry later")
        self._ensure_started()
        handle = RequestHandle(request)
        if self.observer is not None:
            self.observer.on_submit(handle)
        self._inbox.put(("add", handle))
        return handle

    def abort(self, handle: RequestHandle) -> None:
        handle.cancelled = True
        self._inbox.put(("abort", handle))

    def call_in_loop(self, fn):
        """Run fn() on the loop thread between two steps (e.g. scaling a stage); returns its result."""
        if self._stop.is_set():
            raise RuntimeError("the engine loop is stopped; nothing would run the call")
        self._ensure_started()
        future = Future()
        self._inbox.put(("call", (fn, future)))
        return future.result()

    @property
    def alive(self) -> bool:
        """Not stopped, and its thread runs or has yet to start (readiness, coordinator/http_api.py)."""
        return not self._stop.is_set() and (self._thread.is_alive() or self._thread.ident is None)

    def _ensure_started(self) -> None:
        with self._start_lock:
            if not self._thread.is_alive() and not self._stop.is_set():
                self._thread.start()

    # ---- the loop thread --------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_work())
            if self.engine.has_work():
                self._step()

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
        if handle.cancelled:  # aborted before it reached the engine; its caller may still be waiting
            handle.events.put(Event([], done=True))
            return
        try:
            handle.seq = self.engine.add(handle.request)
        except BaseException as exc:  # e.g. a request larger than any worker's KV cache
            handle.events.put(Event([], done=True, error=exc))
            return
        self._handles[handle.seq.seq_id] = handle

    def _step(self) -> None:
        started = time.perf_counter()
        seqs = self.engine.step()
        if self.observer is not None:
            self.observer.on_step(started, seqs)
        for seq in seqs:
            handle = self._handles.get(seq.seq_id)
            if handle is not None:
                self._deliver(handle)

    def _deliver(self, handle: RequestHandle) -> None:
        seq = handle.seq
        if seq.error is not None:
            self._handles.pop(seq.seq_id, None)
            handle.events.put(Event([], done=True, error=seq.error))
            return
        new = seq.new_tokens[handle._sent :]
        if new and handle.first_token_at is None:
            handle.first_token_at = time.perf_counter()
        if new or seq.finished:
            used = seq.stages_used[handle._sent : handle._sent + len(new)]
            handle._sent += len(new)
            handle.events.put(Event(new, used, done=seq.finished))
        if seq.finished:
            self._handles.pop(seq.seq_id, None)

    def _finish(self, handle: RequestHandle) -> None:
        self._handles.pop(handle.seq.seq_id, None)
        handle.events.put(Event([], done=True))
