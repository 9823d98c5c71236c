"""How a decode step's messages cross four Ray actors: the measurement behind `RemoteWorker`.

Four `Hop` actors stand in for the stage workers: each receives a trunk state (x, x0,
x_backout: 3 x (B, C)), does no model work, and hands the state on with its stage's logits
(B, V), in the workers' own message types, so they cross Ray as real calls do. Per token, for each transport, we time the round trip through all four:

- `plain`: the coordinator calls each actor and waits (`ray.get`) before calling the next;
  every stage's logits come back to the coordinator, which does Log-OP (what `PoECluster` does).
- `chained`: the coordinator passes each actor's `ObjectRef` straight to the next and waits
  once; a running Log-OP accumulator (B, V) travels with the state, so one (B, V) returns.
- `compiled`: the same chain as a Ray Compiled Graph (shared-memory channels, no per-call
  task submission), accumulator travelling with the state.

Also measured: `plain` without logits in the replies, which is the cost of reducing in the
coordinator rather than in an accumulator. Results are microseconds per token.
"""

from __future__ import annotations

import time

import ray
import torch

from stage_workers.messages import ExtendResult, TrunkState

TRANSPORTS = ("plain", "plain_no_logits", "chained", "compiled")


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


def _time_per_token(fn, tokens: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(tokens):
        fn()
    return (time.perf_counter() - started) / tokens * 1e6


def measure(n_embd: int, vocab: int, batch: int = 1, tokens: int = 200, stages: int = 4) -> dict[str, float]:
    """Microseconds per token through `stages` actors for each transport (joins the running Ray)."""
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
