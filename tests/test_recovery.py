"""Lost stage workers, for real: the worker's process is killed with SIGKILL mid-generation, or
hangs inside a step.

Ray restarts the actor (it reloads its slice); the engine rebuilds the sequences that worker
held from their committed tokens, so in-flight requests end with the tokens they would have
had. A worker that hangs is killed once the step timeout passes, and the same happens. With no
restarts left the requests fail with UNAVAILABLE, promptly, and the server stays up.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
import ray
import torch

from coordinator import PoEModel, load_tokenizer
from coordinator.grpc_api.server import Server
from coordinator.serving_config import ServingConfig
from tools.client import PoEClient

NEW_TOKENS = 40
JOBS = [  # (client kwargs, reference call)
    (dict(mode="full"), lambda m, ids: m.generate(ids, NEW_TOKENS)),
    (dict(mode="speculative", draft_stage=0, k_draft=3), lambda m, ids: m.generate_speculative(ids, 0, 3, NEW_TOKENS)),
    (dict(mode="wand", safety=1.0, p99_bounds=[0.6, 0.6, 0.6, 0.0]),
     lambda m, ids: m.generate_wand(ids, NEW_TOKENS, 1.0, [0.6, 0.6, 0.6, 0.0])),
]


def prompt(seed: int) -> list[int]:
    return torch.randint(0, 500, (24,), generator=torch.Generator().manual_seed(seed)).tolist()


def stream_in_threads(address: str, started: threading.Event):
    """Start one streaming request per job; returns (threads, results) with results[i] = tokens or error."""
    results: dict[int, object] = {}

    def run(i: int, kwargs: dict) -> None:
        tokens = []
        try:
            with PoEClient(address, timeout=180) as client:
                for chunk in client.stream(token_ids=prompt(i), max_new_tokens=NEW_TOKENS, **kwargs):
                    tokens.extend(chunk.token_ids)
                    if len(tokens) >= 3:
                        started.set()
            results[i] = tokens
        except grpc.RpcError as exc:
            results[i] = exc
            started.set()

    threads = [threading.Thread(target=run, args=(i, kwargs)) for i, (kwargs, _) in enumerate(JOBS)]
    for t in threads:
        t.start()
    return threads, results


def kill_worker_process(cluster: PoEModel, stage: int) -> int:
    pid = ray.get(cluster.backend.actors[stage].pid.remote())
    os.kill(pid, signal.SIGKILL)
    return pid


def watch_rebuilds(cluster: PoEModel) -> list[tuple[int, int]]:
    """(seq_id, new tokens it had) of every sequence the engine rebuilds from now on."""
    rebuilt = []
    rebuild = cluster.engine.rebuild
    cluster.engine.rebuild = lambda seqs: (rebuilt.extend((s.seq_id, len(s.new_tokens)) for s in seqs), rebuild(seqs))
    return rebuilt


@pytest.mark.parametrize("groups", [(), ((0, 1), (2, 3))], ids=["per-stage", "stage-groups"])
def test_killed_worker_restarts_and_requests_finish_with_their_tokens(ray_session, tiny_dir, groups):
    """With stage groups, the killed worker serves stages 2 and 3."""
    reference = PoEModel.from_pretrained(tiny_dir)
    expected = [call(reference, torch.tensor([prompt(i)]))[0, 24:].tolist() for i, (_, call) in enumerate(JOBS)]
    with PoEModel.on_ray(tiny_dir, config=ServingConfig(groups=groups)) as cluster:
        server = Server(cluster, load_tokenizer(tiny_dir), port=0)
        rebuilt = watch_rebuilds(cluster)
        try:
            started = threading.Event()
            threads, results = stream_in_threads(server.address, started)
            assert started.wait(120), "no tokens before the fault"
            old_pid = kill_worker_process(cluster, stage=2)
            in_flight = [len(s.new_tokens) for s in cluster.engine.running]
            assert in_flight and max(in_flight) < NEW_TOKENS, "the kill landed mid-generation"
            for t in threads:
                t.join(timeout=180)
            for i in range(len(JOBS)):
                assert results.get(i) == expected[i], f"request {i} ({JOBS[i][0]['mode']}): {results.get(i)}"
            assert ray.get(cluster.backend.actors[2].pid.remote()) != old_pid, "Ray restarted the worker in a new process"
            assert len(rebuilt) == len(JOBS) and all(n < NEW_TOKENS for _, n in rebuilt) and max(n for _, n in rebuilt), (
                f"every request was rebuilt mid-generation: (seq_id, tokens it had) {rebuilt}")
            with PoEClient(server.address, timeout=60) as client:  # and the server keeps serving
                reply = client.generate(token_ids=prompt(9), max_new_tokens=5)
            assert list(reply.token_ids) == reference.generate(torch.tensor([prompt(9)]), 5)[0, 24:].tolist()
        finally:
            server.stop(0)


def test_without_restarts_requests_fail_unavailable_and_do_not_hang(ray_session, tiny_dir):
    with PoEModel.on_ray(tiny_dir, config=ServingConfig(max_worker_restarts=0)) as cluster:
        server = Server(cluster, load_tokenizer(tiny_dir), port=0)
        try:
            started = threading.Event()
            threads, results = stream_in_threads(server.address, started)
            assert started.wait(120)
            kill_worker_process(cluster, stage=1)
            t0 = time.perf_counter()
            for t in threads:
                t.join(timeout=120)
            assert time.perf_counter() - t0 < 120, "requests hung after the worker was lost"
            codes = [r.code() if isinstance(r, grpc.RpcError) else "finished" for r in results.values()]
            assert grpc.StatusCode.UNAVAILABLE in codes and set(codes) <= {grpc.StatusCode.UNAVAILABLE, "finished"}
            with PoEClient(server.address, timeout=30) as client:
                assert client.health() == "NOT_SERVING"  # readiness: a stage is down for good
                with pytest.raises(grpc.RpcError) as err:
                    client.generate(token_ids=prompt(3), max_new_tokens=3)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "stage 1" in err.value.details()
        finally:
            server.stop(0)


def test_a_worker_that_hangs_is_killed_after_the_step_timeout_and_requests_keep_their_tokens(ray_session, tiny_dir):
    def hang_in_the_next_step(actor_self) -> None:  # defined here: it travels to the worker by value
        """Run inside a worker's process: its next extend sleeps far past the step timeout."""
        import time as clock

        def hang(batch):
            clock.sleep(3600)

        actor_self.worker.extend = hang

    reference = PoEModel.from_pretrained(tiny_dir)
    ids = torch.tensor([prompt(i) for i in range(2)])
    expected = reference.generate(ids, 12)
    with PoEModel.on_ray(tiny_dir, config=ServingConfig(step_timeout_s=8.0)) as cluster:
        cluster.generate(ids, 2)  # warm-up
        rebuilt = watch_rebuilds(cluster)
        old_pid = ray.get(cluster.backend.actors[1].pid.remote())
        ray.get(cluster.backend.actors[1].__ray_call__.remote(hang_in_the_next_step))
        started = time.perf_counter()
        out = cluster.generate(ids, 12)
        elapsed = time.perf_counter() - started
        assert torch.equal(out, expected)
        assert rebuilt, "the hung worker's sequences were rebuilt"
        assert ray.get(cluster.backend.actors[1].pid.remote()) != old_pid, "it was killed and Ray restarted it"
        assert elapsed < 60, f"the step did not wait for the hung worker ({elapsed:.0f}s)"
