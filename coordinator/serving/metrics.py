"""Prometheus metrics of one engine loop: vLLM's, named `poe:` where vLLM says `vllm:`, and PoE's own.

`Metrics(model, model_name)` owns a registry; `attach(loop)` makes it one of the loop's observers, so it
counts every request the loop serves, whoever sent it (gRPC, HTTP, Python). It wraps each
request's event queue as it is submitted and counts what the caller is told, as the loop puts it:
every way the loop ends a request is counted, whichever code path ends it. Each step tells it
which sequences ran (queue time, prefill tokens) and how long the step took. Request counts and
KV usage are read from the engine at scrape time, and each stage's busy time from its workers. It
knows the loop's events, the engine's counts and the model's stage signals, not HTTP or gRPC.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.core.engine_loop import EngineLoop, Event, RequestHandle

log = logging.getLogger("poe_serve.metrics")

PREFIX = "poe:"
# seconds; from 1 ms (a decode step of a small model) to over 15 min (a long queued generation)
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0,
           100.0, 250.0, 1000.0)
COMPLETED = ("stop", "length", "scored")  # finish reasons of a request that ran to its end


class _Watched(queue.Queue):
    """A request's event queue that tells the metrics of each event as the loop puts it."""

    def __init__(self, metrics: Metrics, handle: RequestHandle):
        super().__init__()
        self.metrics, self.handle = metrics, handle
        self.last_token_at: float | None = None
        self.num_proposed = self.num_accepted = 0  # speculative drafts already counted
        self.finished_reason: str | None = None  # set when a front ends the request (a stop string)

    def put(self, event: Event, block: bool = True, timeout: float | None = None) -> None:
        self.metrics._on_event(self, event)
        super().put(event, block, timeout)


class Metrics:
    def __init__(self, model, model_name: str):
        """`model`: a PoEModel, in process or on Ray (its engine's counts are read at scrape time)."""
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineGauges(model, model_name))

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(PREFIX + name, doc, ["model_name", *labels], registry=self.registry)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(PREFIX + name, doc, ["model_name"], buckets=BUCKETS, registry=self.registry)

        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens of admitted requests (<|bos|> included)")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.request_success = counter("request_success", "Requests finished, by reason: stop, length, scored "
                                       "(a scoring pass), abort (cancelled or client gone), error", "finished_reason")
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Speculative draft tokens proposed")
        self.accepted_tokens = counter("spec_decode_num_accepted_tokens", "Speculative draft tokens accepted")
        self.wand_exits = counter("wand_exits", "WAND tokens by the stage they exited at", "stage")
        self.ttft = histogram("time_to_first_token_seconds", "Submission to first generated token")
        self.itl = histogram("inter_token_latency_seconds", "Between successive deliveries of a request's tokens")
        self.e2e = histogram("e2e_request_latency_seconds", "Submission to the end, of requests that ran to it")
        self.queue_time = histogram("request_queue_time_seconds", "Submission to the first step that ran it")
        self.step_time = histogram("engine_step_seconds", "One engine step: schedule, every stage, update")
        for k in range(model.config.num_stages):  # every stage's series from the start, at 0
            self.wand_exits.labels(model_name, str(k))
        self._admitting: dict[int, _Watched] = {}  # id -> queue of each request not yet run by a step
        self._lock = threading.Lock()

    def attach(self, loop: EngineLoop) -> None:
        if self not in loop.observers:
            loop.observers.append(self)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    # ---- hooks for the fronts and the data plane ------------------------------------------------
    def end_at_stop_string(self, handle: RequestHandle) -> None:
        """A front is about to abort this request because a stop string ended it: count it as
        finished_reason=stop rather than abort."""
        if isinstance(handle.events, _Watched):
            handle.events.finished_reason = "stop"

    # ---- told by the engine loop --------------------------------------------------------------
    def on_submit(self, handle: RequestHandle) -> None:
        handle.events = watched = _Watched(self, handle)
        with self._lock:
            self._admitting[id(watched)] = watched

    def on_step(self, started: float, seqs: list) -> None:
        """On the loop thread, after a step over `seqs` that began at `started` (perf_counter)."""
        self.step_time.labels(self.model_name).observe(time.perf_counter() - started)
        ran = {seq.seq_id for seq in seqs}
        with self._lock:
            admitted = [w for w in self._admitting.values() if w.handle.seq is not None and w.handle.seq.seq_id in ran]
            for w in admitted:
                del self._admitting[id(w)]
        for w in admitted:
            self.queue_time.labels(self.model_name).observe(started - w.handle.submitted_at)
            self.prompt_tokens.labels(self.model_name).inc(w.handle.seq.num_prompt)

    def _on_event(self, watched: _Watched, event: Event) -> None:
        now, handle, name = time.perf_counter(), watched.handle, self.model_name
        if event.tokens:
            if watched.last_token_at is None:
                self.ttft.labels(name).observe(now - handle.submitted_at)
            else:
                self.itl.labels(name).observe(now - watched.last_token_at)
            watched.last_token_at = now
            self.generation_tokens.labels(name).inc(len(event.tokens))
        for stage in event.stages_used:
            self.wand_exits.labels(name, str(stage)).inc()
        seq = handle.seq
        if seq is not None and seq.num_proposed > watched.num_proposed:
            self.draft_tokens.labels(name).inc(seq.num_proposed - watched.num_proposed)
            self.accepted_tokens.labels(name).inc(seq.num_accepted - watched.num_accepted)
            watched.num_proposed, watched.num_accepted = seq.num_proposed, seq.num_accepted
        if event.done or event.error is not None:
            with self._lock:
                self._admitting.pop(id(watched), None)
            reason = "error" if event.error is not None else watched.finished_reason or (
                seq.finish_reason if seq is not None and seq.finish_reason in COMPLETED else "abort")
            self.request_success.labels(name, reason).inc()
            if reason in COMPLETED:
                self.e2e.labels(name).observe(now - handle.submitted_at)


class _EngineGauges(Collector):
    """Read at scrape time: requests running and waiting, the share of each replica's KV blocks
    promised to admitted sequences (each is promised its whole length, less its cached blocks) and
    the share the prefix cache keeps, the prefix cache's queries and hits, and each stage's busy
    seconds summed over its live workers (a restarted or removed worker's time starts again from
    0, which Prometheus' rate() reads as a counter reset)."""

    def __init__(self, model, model_name: str):
        self.model, self.engine, self.model_name = model, model.engine, model_name

    def collect(self):
        running = GaugeMetricFamily(PREFIX + "num_requests_running", "Requests in the running batch",
                                    labels=["model_name"])
        running.add_metric([self.model_name], len(self.engine.running))
        waiting = GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests waiting for KV room to be admitted",
                                    labels=["model_name"])
        waiting.add_metric([self.model_name], len(self.engine.waiting))
        kv = GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "KV blocks of a replica promised to running "
                               "sequences (0..1)", labels=["model_name", "stage", "replica"])
        cached = GaugeMetricFamily(PREFIX + "kv_cache_cached_perc", "KV blocks of a replica kept by the prefix "
                                   "cache, shared or evictable (0..1)", labels=["model_name", "stage", "replica"])
        replicas = GaugeMetricFamily(PREFIX + "stage_replicas", "Workers serving a stage (autoscaling moves it)",
                                     labels=["model_name", "stage"])
        for k, stage in enumerate(self.engine.stages):
            for r, (capacity, promised, kept) in enumerate(zip(list(stage.capacity), list(stage.promised),
                                                               list(stage.cached))):
                kv.add_metric([self.model_name, str(k), str(r)], promised / capacity if capacity else 0.0)
                cached.add_metric([self.model_name, str(k), str(r)], kept / capacity if capacity else 0.0)
            replicas.add_metric([self.model_name, str(k)], len(stage.workers))
        stats = self.engine.cache.stats
        queries = CounterMetricFamily(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                      "cache", labels=["model_name"])
        queries.add_metric([self.model_name], stats.queries)
        hits = CounterMetricFamily(PREFIX + "prefix_cache_hits", "Prompt tokens found cached on every stage "
                                   "their request runs", labels=["model_name"])
        hits.add_metric([self.model_name], stats.hits)
        busy = CounterMetricFamily(PREFIX + "stage_busy_seconds", "Seconds a stage's workers spent computing "
                                   "and deciding (utilization: rate / replicas)", labels=["model_name", "stage"])
        try:
            for k, signals in enumerate(self.model.stage_signals()):
                busy.add_metric([self.model_name, str(k)], signals.busy_s)
        except Exception as exc:  # a worker being restarted: this scrape has no busy figures
            log.warning("stage busy time not read: %s", exc)
        return [running, waiting, kv, cached, replicas, queries, hits, busy]
