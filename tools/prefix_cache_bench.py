"""The `prefix_cache` section of `poe-serve bench`: one shared-prefix workload, cache off then on.

The workload (`PrefixWorkload`): `requests` requests arrive together, each a `prefix_len`-token
prefix they all share (a system prompt, few-shot examples) and a `suffix_len`-token suffix of its
own, each generating `new_tokens` tokens, full PoE greedy. The same prompts run on an in-process
`PoEModel` with `enable_prefix_caching` off, then on, in one run. Reported: time to first token
(p50, p99) and wall time of each, whether every request got the same tokens, the hit rate
(prompt tokens found cached on every stage over prompt tokens looked up), and the KV the cache
holds at the end against each stage's pool.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch

from coordinator.core import requests as rq
from coordinator.core.engine import EngineConfig


@dataclass(frozen=True)
class PrefixWorkload:
    requests: int = 32
    prefix_len: int = 512
    suffix_len: int = 32
    new_tokens: int = 16


def workload_prompts(vocab: int, w: PrefixWorkload, seed: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, vocab, (w.prefix_len,), generator=g).tolist()
    return [prefix + torch.randint(0, vocab, (w.suffix_len,), generator=g).tolist() for _ in range(w.requests)]


def run_once(checkpoint: str, dtype, device: str, prompts: list[list[int]], new_tokens: int, caching: bool) -> dict:
    """The workload on a fresh model: per-request time to first token, tokens, and the cache's state."""
    from coordinator import PoEModel

    model = PoEModel.from_pretrained(checkpoint, dtype=dtype, device=device,
                                     engine_config=EngineConfig(enable_prefix_caching=caching))
    try:
        model.generate(torch.tensor([prompts[0][:8]]), 2)  # warm-up, sharing no full block with the workload
        engine, mode = model.engine, rq.full_mode(model.config)
        hits, queries = engine.cache.stats.hits, engine.cache.stats.queries
        t0 = time.perf_counter()
        handles = [model.loop.submit(rq.GenerationRequest(tuple(p), new_tokens, mode), limit_queue=False)
                   for p in prompts]
        seqs = [h.result() for h in handles]
        wall = time.perf_counter() - t0
        ttft = sorted(h.first_token_at - h.submitted_at for h in handles)
        workers = [stage.workers[0] for stage in engine.stages]
        block_mib = [w.cache.nbytes / (w.cache.num_blocks + 1) / 2**20 for w in workers]  # K and V of one block
        runners = engine.pipeline.transport.runners.values()
        return {
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": ttft[min(len(ttft) - 1, round(0.99 * len(ttft)))],
            "wall_s": wall, "tokens": [s.new_tokens for s in seqs],
            "cached_tokens": [s.num_cached_tokens for s in seqs],
            "hit_rate": (engine.cache.stats.hits - hits) / max(engine.cache.stats.queries - queries, 1),
            "cache_blocks": [sum(stage.cached) for stage in engine.stages],
            "cache_mib": [sum(stage.cached) * b for stage, b in zip(engine.stages, block_mib)],
            "pool_mib": [stage.num_blocks * b for stage, b in zip(engine.stages, block_mib)],
            "kept_rows_mib": sum(t.nbytes for r in runners for rows in r.state.block_rows.values()
                                 for t in (rows.trunk.x, rows.trunk.x0, rows.trunk.x_backout) if t is not None) / 2**20,
        }
    finally:
        model.shutdown()


def prefix_cache_section(checkpoint: str, dtype, device: str, w: PrefixWorkload = PrefixWorkload()) -> dict:
    from stage_workers.config import load_config

    config = load_config(checkpoint)
    w = replace(w, prefix_len=min(w.prefix_len, config.sequence_len - w.suffix_len - w.new_tokens))  # a short context
    prompts = workload_prompts(config.vocab_size, w)
    off = run_once(checkpoint, dtype, device, prompts, w.new_tokens, caching=False)
    on = run_once(checkpoint, dtype, device, prompts, w.new_tokens, caching=True)
    same = off.pop("tokens") == on.pop("tokens")
    return {"checkpoint": checkpoint, "workload": asdict(w), "off": off, "on": on, "same_tokens": same,
            "ttft_p50_speedup": off["ttft_p50_s"] / on["ttft_p50_s"], "wall_speedup": off["wall_s"] / on["wall_s"],
            "hit_rate": on["hit_rate"]}


def render(p: dict) -> list[str]:
    w, on, off = p["workload"], p["on"], p["off"]
    share = ", ".join(f"{c:.1f}/{t:.0f}" for c, t in zip(on["cache_mib"], on["pool_mib"]))
    return [
        f"prefix cache ({w['requests']} requests at once, {w['prefix_len']}-token shared prefix + {w['suffix_len']} "
        f"own, {w['new_tokens']} new tokens):",
        f"  time to first token p50 {off['ttft_p50_s']:.2f} s off, {on['ttft_p50_s']:.2f} s on "
        f"({p['ttft_p50_speedup']:.1f}x); p99 {off['ttft_p99_s']:.2f} / {on['ttft_p99_s']:.2f} s; "
        f"wall {off['wall_s']:.2f} / {on['wall_s']:.2f} s ({p['wall_speedup']:.1f}x)",
        f"  hit rate {p['hit_rate']:.1%}, same tokens: {p['same_tokens']}; cache MiB / KV pool MiB per stage: {share}",
    ]
