"""The engine loop under faults, on stop, and under a storm of submits: no request waits forever.

Faults are injected into the engine methods the loop drives (`schedule`, `update`, `_recover`) on
a fresh in-process tiny model each time. A fault inside a step (`update`) fails that step's
requests and the loop serves on; a fault outside it (`schedule`, `_recover`) ends the loop: every
request not yet ended (running, waiting in the engine, still in the inbox) and every queued call
fails with EngineLoopDown, and so does every later call.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest

from coordinator import PoEModel
from coordinator.core import requests as rq
from coordinator.core.engine import EngineConfig
from coordinator.core.engine_loop import EngineLoop, EngineLoopDown, QueueFull
from stage_workers.messages import WorkerLost

BOUND_S = 10  # no wait below may take longer; on the code before this change, they took forever


class Boom(BaseException):
    """Not even an Exception: the loop must still fail its requests."""


def fresh(tiny_dir, **engine_kwargs) -> PoEModel:
    return PoEModel.from_pretrained(tiny_dir, engine_config=EngineConfig(**engine_kwargs))


def request(model: PoEModel, seed: int, max_new_tokens: int = 40) -> rq.GenerationRequest:
    return rq.GenerationRequest((seed + 1, seed + 2, seed + 3), max_new_tokens, rq.full_mode(model.config))


def reference(tiny_model, req: rq.GenerationRequest) -> list[int]:
    return tiny_model.generate([list(req.prompt_ids)], req.max_new_tokens)[0, len(req.prompt_ids):].tolist()


def on_call(monkeypatch, obj, name: str, number: int, fault) -> None:
    """obj.name runs as before except its `number`-th call, which runs fault(*args) instead."""
    real, calls = getattr(obj, name), []

    def patched(*args, **kwargs):
        calls.append(None)
        return fault(*args, **kwargs) if len(calls) == number else real(*args, **kwargs)

    monkeypatch.setattr(obj, name, patched)


def raising(error: BaseException):
    def fault(*_args):
        raise error

    return fault


def ends_with(handle, error_type) -> BaseException:
    """The error the handle ended with; fails if it finished, or if it took longer than BOUND_S."""
    t0 = time.monotonic()
    with pytest.raises(error_type) as err:
        handle.result(timeout=BOUND_S)
    assert time.monotonic() - t0 < BOUND_S
    return err.value


@pytest.mark.parametrize("error", [RuntimeError("injected"), Boom("injected")], ids=["Exception", "BaseException"])
@pytest.mark.parametrize("where", ["schedule", "_recover"])
def test_a_fault_outside_a_step_fails_every_outstanding_request_and_every_later_call(tiny_dir, monkeypatch,
                                                                                   where, error):
    model = fresh(tiny_dir, max_num_seqs=2)
    engine, loop = model.engine, model.loop
    reached, release = threading.Event(), threading.Event()

    def fault(*_args):
        reached.set()
        release.wait(BOUND_S)  # meanwhile more requests and a call pile up in the inbox
        raise error

    if where == "schedule":
        on_call(monkeypatch, engine, "schedule", 4, fault)
    else:  # a lost worker, then a fault while recovering from it
        on_call(monkeypatch, model.workers[1], "extend", 4, raising(WorkerLost(1, "injected", restarted=True)))
        monkeypatch.setattr(engine, "_recover", fault)
    handles = [loop.submit(request(model, seed)) for seed in range(4)]  # two run, two wait
    assert reached.wait(BOUND_S), "the fault was not reached"
    assert len(engine.running) == 2 and len(engine.waiting) == 2
    handles += [loop.submit(request(model, seed)) for seed in range(4, 6)]  # still in the inbox
    queued, put = threading.Event(), loop._inbox.put

    def put_and_tell(item, *args, **kwargs):
        put(item, *args, **kwargs)
        if item is not None and item[0] == "call":
            queued.set()

    monkeypatch.setattr(loop._inbox, "put", put_and_tell)
    call_result: list[pytest.ExceptionInfo] = []
    caller = threading.Thread(target=lambda: call_result.append(pytest.raises(EngineLoopDown, loop.call_in_loop,
                                                                              lambda: "ran")))
    caller.start()
    assert queued.wait(BOUND_S), "the call was not queued"
    assert loop.failure() is None, "the loop was still up when the call was queued behind the fault"
    release.set()
    for handle in handles:
        assert ends_with(handle, EngineLoopDown).__cause__ is error
    caller.join(BOUND_S)
    assert not caller.is_alive() and call_result, "call_in_loop returned the loop's failure"
    assert call_result[0].value.__cause__ is error, "the queued call failed with the loop's fault"
    assert loop.failure() is not None
    with pytest.raises(EngineLoopDown):
        loop.submit(request(model, 9))
    with pytest.raises(EngineLoopDown):
        model.generate([[1, 2, 3]], 2)
    with pytest.raises(EngineLoopDown):
        loop.call_in_loop(lambda: "ran")


def test_a_fault_inside_a_step_fails_that_steps_requests_and_the_loop_serves_on(tiny_dir, tiny_model, monkeypatch):
    model = fresh(tiny_dir, max_num_seqs=2)
    error = RuntimeError("injected")
    on_call(monkeypatch, model.engine, "update", 3, raising(error))
    jobs = [request(model, seed, max_new_tokens=6) for seed in range(4)]
    handles = [model.loop.submit(job) for job in jobs]
    assert ends_with(handles[0], RuntimeError) is error and ends_with(handles[1], RuntimeError) is error
    assert [h.result(timeout=BOUND_S).new_tokens for h in handles[2:]] == [reference(tiny_model, j) for j in jobs[2:]]
    assert model.loop.failure() is None
    assert model.generate([[1, 2, 3]], 4).tolist() == tiny_model.generate([[1, 2, 3]], 4).tolist()


def test_stop_fails_every_request_not_yet_ended(tiny_dir):
    model = fresh(tiny_dir, max_num_seqs=1)
    handles = [model.loop.submit(request(model, seed, max_new_tokens=200)) for seed in range(3)]
    assert handles[0].next_event(timeout=BOUND_S).tokens is not None  # the first is generating
    model.loop.stop()
    for handle in handles:
        ends_with(handle, EngineLoopDown)
    with pytest.raises(EngineLoopDown, match="stopped"):
        model.loop.submit(request(model, 5))
    with pytest.raises(EngineLoopDown, match="stopped"):
        model.loop.call_in_loop(lambda: "ran")


class SilentLoop(EngineLoop):
    def _run(self) -> None:
        """A loop thread that ends at once, failing nobody (as if killed from outside)."""


def test_waits_end_when_the_loop_thread_ends_without_a_word(tiny_dir):
    loop = SilentLoop(fresh(tiny_dir).engine)
    handle = loop.submit(rq.GenerationRequest((1, 2), 3, rq.full_mode(loop.engine.config)))
    ends_with(handle, EngineLoopDown)
    with pytest.raises(EngineLoopDown, match="ended unexpectedly"):
        loop.call_in_loop(lambda: "ran")


def test_admission_takes_max_queue_requests_beyond_the_running_batch_however_many_threads_race(tiny_dir):
    model = fresh(tiny_dir, max_num_seqs=2)
    loop = model.loop
    loop.max_queue = 5
    running = [loop.submit(request(model, seed, max_new_tokens=30)) for seed in range(2)]
    for handle in running:
        assert handle.next_event(timeout=BOUND_S).tokens, "both requests are generating"
    entered, gate = threading.Event(), threading.Event()
    holder = threading.Thread(target=loop.call_in_loop, args=(lambda: entered.set() or gate.wait(BOUND_S),))
    holder.start()  # the loop thread now waits between two steps: nothing leaves the queue
    assert entered.wait(BOUND_S) and len(model.engine.running) == 2 and not model.engine.waiting
    num_threads = 48
    start, outcomes, lock = threading.Barrier(num_threads), [], threading.Lock()

    def submit(i):
        start.wait()
        try:
            handle = loop.submit(request(model, 10 + i, max_new_tokens=2))
        except QueueFull:
            handle = None
        with lock:
            outcomes.append(handle)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: any check-then-act gap shows
    try:
        threads = [threading.Thread(target=submit, args=(i,)) for i in range(num_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(BOUND_S)
    finally:
        sys.setswitchinterval(interval)
        gate.set()
    admitted = [h for h in outcomes if h is not None]
    assert len(outcomes) == num_threads and len(admitted) == loop.max_queue, f"admitted {len(admitted)}"
    for handle, n in [(h, 30) for h in running] + [(h, 2) for h in admitted]:
        assert len(handle.result(timeout=BOUND_S).new_tokens) == n
