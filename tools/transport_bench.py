"""How a decode step crosses four stage workers in their own processes, with no model work.

`channels` is the data plane `PoEModel.on_ray` uses: four Ray actors run the real `StageRunner`
loop over shared-memory channels, driven by the real engine and `ChannelTransport`; each
stage's stand-in worker returns its input state and fixed logits of the vocabulary's size
instead of computing, so the time per token is the data plane's own cost (the plan broadcast,
three stage-to-stage hops with x, x0, the backout residual and the Log-OP sum, the report, and
the runners' Log-OP and decision math). `per_hop_us` is the transport alone: a decode step's
boundary message relayed through four worker processes over shared memory and back, per hop.

The other figures are the designs it replaced, measured in the same run: four `Hop` actors
take a trunk state (x, x0, x_backout: 3 x (B, C)) and hand it on with their stage's logits
(B, V), in the workers' message types, as Ray calls:
- `plain`: the coordinator calls each actor and waits (`ray.get`) before calling the next;
  every stage's logits come back to the coordinator, which does Log-OP (the design before the data plane);
- `plain_no_logits`: the same without logits in the replies;
- `chained`: each actor's `ObjectRef` goes straight to the next, a Log-OP sum travelling along;
- `compiled`: that chain as a Ray Compiled Graph.
Results are microseconds per token.
"""

from __future__ import annotations

import time
import uuid

import ray
import torch

from coordinator.core import requests as rq
from coordinator.core.engine import Engine, EngineConfig
from coordinator.core.pipeline import Pipeline
from coordinator.core.transport import ChannelTransport
from coordinator.ray_cluster.cluster import CPU_WORKER_ENV, RayProcesses, RemoteWorker, StageActor, _data_slot_bytes
from coordinator.serving_config import ServingConfig
from stage_workers.channels import ShmChannel
from stage_workers.config import config_from_dict
from stage_workers.messages import Boundary, ExtendResult, Handoff, TrunkState, WorkerInfo

TRANSPORTS = ("channels", "plain", "plain_no_logits", "chained", "compiled")


class Hop:
    """A stand-in stage worker: the trunk state passes through, with this stage's logits."""

    def __init__(self, vocab: int):
        self.logits = torch.randn(1, vocab)

    def step(self, message: ExtendResult, with_logits: bool = True) -> ExtendResult:
        """Plain: the trunk state on, this stage's logits back."""
        B = message.trunk.x.shape[0]
        return ExtendResult(message.trunk, self.logits.expand(B, -1).clone() if with_logits else None)

    def step_acc(self, message: ExtendResult) -> ExtendResult:
        """Chained: add this stage's log-probs into the travelling accumulator (the logits field)."""
        return ExtendResult(message.trunk, message.logits + self.logits)


class EchoWorker:
    """A stage worker that computes nothing: its input state goes on, with fixed stage logits."""

    def __init__(self, stage: int, n_embd: int, vocab: int):
        self.stage, self.n_embd, self.device = stage, n_embd, torch.device("cpu")
        self.busy_s = 0.0
        self.logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(stage))  # (1, V)

    def extend(self, batch) -> ExtendResult:
        N, M = batch.token_ids.shape[0], sum(s.num_logits for s in batch.segments)
        trunk = batch.trunk if batch.trunk is not None else TrunkState(*(torch.zeros(N, self.n_embd) for _ in range(3)))
        return ExtendResult(trunk, self.logits.expand(M, -1).clone() if M else None)

    def rollback(self, seq_id: int, length: int) -> None:
        pass

    def free(self, seq_id: int) -> None:
        pass

    def keep(self, block_id: int, seq_id: int, index: int) -> None:
        pass  # it keeps no KV, so a prefix cache's blocks are nothing here either

    def share(self, seq_id: int, block_ids: list[int]) -> None:
        pass

    def evict(self, block_id: int) -> None:
        pass

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.stage, (self.stage, self.stage), "cpu", "float32", 0, 16, 1 << 16, 1 << 16, 0)


class EchoStageActor(StageActor):
    """`StageActor` with an `EchoWorker` in place of a model slice."""

    def __init__(self, stage: int, n_embd: int, vocab: int):
        self.worker, self.channels, self.num_threads = EchoWorker(stage, n_embd, vocab), {}, None
        self.workers = [self.worker]


def channels_per_token(n_embd: int, vocab: int, tokens: int, stages: int = 4, max_run_ahead: int = 1024) -> float:
    """Microseconds per token of one greedy sequence through the real engine and data plane
    (`max_run_ahead` 0: a plan every step, no decode runs)."""
    config = config_from_dict(dict(vocab_size=vocab, n_layer=stages, n_embd=n_embd, n_head=n_embd // 64 or 1,
                                   sequence_len=tokens + 64, poe_stage_layout=[1] * stages))
    actors = [ray.remote(EchoStageActor).options(num_cpus=0, max_concurrency=4,
                                                 runtime_env={"env_vars": CPU_WORKER_ENV}).remote(k, n_embd, vocab)
              for k in range(stages)]
    transport = ChannelTransport(RayProcesses(), 60.0, _data_slot_bytes(config, ServingConfig()))
    try:
        engine = Engine(config, Pipeline([RemoteWorker(a, k) for k, a in enumerate(actors)], transport),
                        EngineConfig(max_run_ahead=max_run_ahead))
        engine.run_to_completion([engine.add(rq.GenerationRequest((1, 2, 3), 4, rq.full_mode(config)))])  # warm-up
        seq = engine.add(rq.GenerationRequest((1, 2, 3), tokens, rq.full_mode(config)))
        engine.step()  # the prompt
        started = time.perf_counter()
        engine.run_to_completion([seq])
        return (time.perf_counter() - started) / (tokens - 1) * 1e6
    finally:
        transport.close()
        for a in actors:
            ray.kill(a)


class Relay:
    """A stand-in worker process that only passes messages on: what one hop of the transport costs."""

    def serve(self, inbound: str, outbound: str, count: int) -> None:
        source = ShmChannel.create(inbound, 1 << 22, 2)
        sink = ShmChannel.attach(outbound, 1 << 22, 2)
        for _ in range(count):
            envelope = source.recv()
            sink.send(envelope.message, envelope.step, envelope.epoch)


def relay_per_hop(n_embd: int, vocab: int, tokens: int, stages: int = 4) -> float:
    """Microseconds per hop of a decode step's Boundary (x, x0, the backout residual and a Log-OP
    sum of the vocabulary's size) relayed through `stages` worker processes over shared memory
    and back: stages + 1 hops per round trip."""
    tag = uuid.uuid4().hex[:10]
    names = [f"relay-{tag}-{i}" for i in range(stages + 1)]
    back = ShmChannel.create(names[-1], 1 << 22, 2)
    relays = [ray.remote(Relay).options(num_cpus=0, runtime_env={"env_vars": CPU_WORKER_ENV}).remote()
              for _ in range(stages)]
    done = [r.serve.remote(names[i], names[i + 1], tokens + 1) for i, r in enumerate(relays)]
    first = ShmChannel.attach(names[0], 1 << 22, 2)
    message = Boundary(0, 0, (Handoff(0, 40, 1, 1, False),), torch.tensor([7]),
                       TrunkState(*(torch.randn(1, n_embd) for _ in range(3))), torch.randn(1, vocab))
    try:
        first.send(message, 0, 0)
        back.recv()  # warm-up
        started = time.perf_counter()
        for step in range(1, tokens + 1):
            first.send(message, step, 0)
            back.recv()
        elapsed = time.perf_counter() - started
        ray.get(done)
        return elapsed / tokens / (stages + 1) * 1e6
    finally:
        first.close()
        back.close()
        for r in relays:
            ray.kill(r)
        for n in names:
            ShmChannel.unlink(n)


def _time_per_token(fn, tokens: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(tokens):
        fn()
    return (time.perf_counter() - started) / tokens * 1e6


def measure(n_embd: int, vocab: int, batch: int = 1, tokens: int = 200, stages: int = 4) -> dict[str, float]:
    """Microseconds per token through `stages` actors for each transport (joins the running Ray)."""
    new = channels_per_token(n_embd, vocab, tokens, stages)
    plan_per_step = channels_per_token(n_embd, vocab, tokens, stages, max_run_ahead=0)
    hops = [ray.remote(Hop).options(num_cpus=0).remote(vocab) for _ in range(stages)]
    ray.get([h.__ray_ready__.remote() for h in hops])
    state = TrunkState(*(torch.randn(batch, n_embd) for _ in range(3)))  # x, x0, x_backout: (B, C)
    acc = torch.zeros(batch, vocab)

    def plain(with_logits: bool):
        message, total = ExtendResult(state, None), torch.zeros(batch, vocab)
        for h in hops:
            message = ray.get(h.step.remote(message, with_logits))
            if with_logits:
                total += message.logits  # the coordinator's Log-OP
        return total

    def chained():
        ref = ExtendResult(state, acc)
        for h in hops:
            ref = h.step_acc.remote(ref)
        return ray.get(ref).logits

    results = {
        "channels": new,
        "channels_plan_per_step": plan_per_step,  # the same without decode runs: the coordinator in every step
        "plain": _time_per_token(lambda: plain(True), tokens),
        "plain_no_logits": _time_per_token(lambda: plain(False), tokens),
        "chained": _time_per_token(chained, tokens),
    }
    from ray.dag import InputNode

    with InputNode() as inp:
        node = inp
        for h in hops:
            node = h.step_acc.bind(node)
    compiled = node.experimental_compile()
    try:
        results["compiled"] = _time_per_token(lambda: ray.get(compiled.execute(ExtendResult(state, acc))).logits, tokens)
    finally:
        compiled.teardown()
        for h in hops:
            ray.kill(h)
    return results
