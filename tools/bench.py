"""`poe-serve bench`: speed and memory of every serving path, measured in one run.

Sections, in order (each a dict in the JSON report):
- `floor`: memory bandwidth measured here and the single-stream ceiling it implies (every
  weight byte is read once per decode step: tok/s <= bandwidth / weight bytes).
- `single_stream`: decode ms/token (prefill left out, `decode_tokens` new tokens) of `PoEModel`
  and of `PoEModel.on_ray`, full and speculative, on one prompt, in `rounds` rounds that
  interleave the two; per-round figures, tok/s from the medians, the ratio's median and spread,
  and the per-token pipeline overhead in ms (cluster - in process).
- `transport`: microseconds per token through four worker processes with no model work: the
  data plane (`channels`, and per hop) and, in the same run, the Ray-call designs it replaced
  (`tools.transport_bench`); medians and spreads over `rounds`.
- `layouts`: single-stream decode through the serving config's worker layout and through one
  worker per stage on the same resources, each with decode runs and with a plan every step,
  against `PoEModel` in the same rounds: the ratio, and the host time per token (wall minus the
  workers' compute) (tools/layouts_bench.py).
- `concurrency`: at each level, that many concurrent streaming gRPC requests (from a client
  process of their own) against a server over `PoEModel.on_ray`: aggregate tok/s, p50/p99 latency and time-to-first-token, errors, and the
  workers' peak resident memory.
- `modes`: every mode once through `PoEModel.on_ray` (seconds per token) and each stage worker's
  parameters, weights + KV bytes and process RSS (the 1.5b memory check uses this alone).
- `prefix_cache`: 32 requests at once sharing a 512-token prefix, each with its own 32-token
  suffix and 16 new tokens, in process with prefix caching off, then on: time to first token,
  same tokens, hit rate, and the KV the cache holds against the pool (tools/prefix_cache_bench.py).
- `speculative` and `wand` on the trained checkpoint: speedup and acceptance against full
  greedy (same tokens asserted) and, sampled at the card's temperature 0.8 and top-p 0.95,
  against full sampling; WAND's mean evaluated layers per token and token agreement.
`--sections` picks a subset (section `trained` makes the last two). Timings are wall-clock on
this machine; compare ratios within one report only.
"""

from __future__ import annotations

import json
import multiprocessing
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from coordinator.core import requests as rq
from coordinator.core.modes import MODES
from stage_workers.compute_thread import off_main_thread
from stage_workers.config import load_config
from tools.demo import CARD_SAMPLING
from tools.layouts_bench import layout_rounds
from tools.prefix_cache_bench import prefix_cache_section
from tools.prefix_cache_bench import render as render_prefix_cache
from tools.progress import Progress

CODE_PROMPTS = ("def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main():\n",
                "class Stack:\n    def __init__(self):\n", "for i in range(10):\n")


SECTIONS = ("floor", "single_stream", "transport", "layouts", "concurrency", "modes", "prefix_cache", "trained")


@dataclass(frozen=True)
class BenchConfig:
    checkpoint: str  # the model timed in single_stream and concurrency
    trained: str  # the model of the speculative and WAND figures
    config: str | None = None  # cluster config for the model on Ray
    prompt_len: int = 48
    new_tokens: int = 32  # per request in concurrency and the trained-model figures
    decode_tokens: int = 128  # single stream: new tokens per timed generation (decode only, prefill left out)
    rounds: int = 3  # single stream and transport: rounds, the in-process model and Ray interleaved; medians reported
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    transport_tokens: int = 200
    dtype: str | None = None  # None: fp32 on CPU, bf16 on CUDA
    device: str = "cpu"  # of the in-process model (and the bandwidth floor); the cluster's comes from `config`
    sections: tuple[str, ...] = SECTIONS

    def __post_init__(self):
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown:
            raise ValueError(f"bench section {unknown[0]!r} is unknown; allowed: {', '.join(SECTIONS)}")
        if "concurrency" in self.sections and not self.concurrency:
            raise ValueError("concurrency: give at least one level")
        if self.rounds < 1 or self.decode_tokens < 2:
            raise ValueError(f"rounds={self.rounds}, decode_tokens={self.decode_tokens}; allowed: rounds >= 1, "
                             "decode_tokens >= 2")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def memory_bandwidth_gbs(device: str = "cpu", megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes read + written per second by a large tensor copy on `device`, best of `repeats`."""
    src = torch.ones(megabytes << 18, device=device)  # fp32
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        if src.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if src.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def prompt_rows(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


SINGLE_STREAM_MODES = {"full": {}, "speculative": {"draft_stage": 0, "k_draft": 3}}


def decode_ms_per_token(model, ids: torch.Tensor, n: int, mode: str) -> tuple[float, float]:
    """(wall, compute) milliseconds per new token after the first event: the prompt's prefill (and
    the tokens that came with it) left out. Compute is the stage workers' own time computing and
    deciding (their `busy_s`), summed over the stages: the rest of the wall time is host work,
    hand-offs and waiting."""
    request = rq.build_requests(model.config, ids, n, MODES[mode].mode(model.config, SINGLE_STREAM_MODES[mode]))[0]
    handle = model.loop.submit(request, limit_queue=False)
    first_at, first, total, busy = None, 0, 0, 0.0
    while True:
        event = handle.next_event(timeout=600)
        if event.error is not None:
            raise event.error
        total += len(event.tokens)
        if first_at is None and event.tokens:
            first_at, first = time.perf_counter(), len(event.tokens)
            busy = sum(model.backend.busy_seconds(model.workers))
        if event.done:
            break
    wall, tokens = time.perf_counter() - first_at, max(total - first, 1)
    return 1000 * wall / tokens, 1000 * (sum(model.backend.busy_seconds(model.workers)) - busy) / tokens


def single_stream_rounds(model, cluster, ids: torch.Tensor, n: int, rounds: int, progress: Progress) -> dict:
    """Decode ms/token of the in-process model and the model on Ray, interleaved round by round
    (model, cluster, model, ...) so that a noisy neighbour hits both; medians and spreads."""
    for m in (model, cluster):  # warm-up: first-call allocations
        decode_ms_per_token(m, ids, 4, "full")
    ms = {side: {mode: [] for mode in SINGLE_STREAM_MODES} for side in ("model", "cluster")}
    compute = {side: [] for side in ("model", "cluster")}  # full decode only
    for r in range(rounds):
        for mode in SINGLE_STREAM_MODES:
            for side, m in (("model", model), ("cluster", cluster)):
                wall, busy = decode_ms_per_token(m, ids, n, mode)
                ms[side][mode].append(wall)
                if mode == "full":
                    compute[side].append(busy)
        progress.update(0, note=f"single stream round {r + 1}/{rounds}")
    ratios = {mode: [a / b for a, b in zip(ms["model"][mode], ms["cluster"][mode])] for mode in SINGLE_STREAM_MODES}
    return {
        "rounds": rounds, "decode_tokens": n,
        "poe_model_ms_per_token": ms["model"], "poe_cluster_ms_per_token": ms["cluster"],
        "poe_model_tok_s": {mode: 1000 / statistics.median(v) for mode, v in ms["model"].items()},
        "poe_cluster_tok_s": {mode: 1000 / statistics.median(v) for mode, v in ms["cluster"].items()},
        "cluster_over_model_full": statistics.median(ratios["full"]),
        "cluster_over_model_full_spread": [min(ratios["full"]), max(ratios["full"])],
        "cluster_over_model_speculative": statistics.median(ratios["speculative"]),
        "cluster_over_model_speculative_spread": [min(ratios["speculative"]), max(ratios["speculative"])],
        "pipeline_overhead_ms_per_token": statistics.median(
            [c - m for m, c in zip(ms["model"]["full"], ms["cluster"]["full"])]),
        # the same stage compute (full decode), in the workers' processes against in one process
        "compute_ms_per_token": compute,
        "compute_cluster_over_model": statistics.median([c / m for m, c in zip(compute["model"], compute["cluster"])]),
    }


def transport_rounds(n_embd: int, vocab: int, tokens: int, rounds: int) -> dict:
    """The transport measurements `rounds` times; medians (the existing keys) and spreads."""
    from tools.transport_bench import measure, relay_per_hop

    runs = [(measure(n_embd, vocab, tokens=tokens), relay_per_hop(n_embd, vocab, tokens * 5)) for _ in range(rounds)]
    kinds = runs[0][0].keys()
    return {"n_embd": n_embd, "vocab_size": vocab, "rounds": rounds,
            "us_per_token": {k: statistics.median(u[k] for u, _ in runs) for k in kinds},
            "us_per_token_spread": {k: [min(u[k] for u, _ in runs), max(u[k] for u, _ in runs)] for k in kinds},
            "per_hop_us": statistics.median(hop for _, hop in runs),
            "per_hop_us_spread": [min(hop for _, hop in runs), max(hop for _, hop in runs)]}


def stream_clients(address: str, level: int, prompts: list[list[int]], n: int) -> dict:
    """`level` gRPC clients streaming at once, one thread each. It runs in a process of its own
    (`concurrency_level`), as real clients would, so their gRPC work does not share the server's
    interpreter lock."""
    from tools.client import PoEClient

    latencies, ttfts, errors, tokens = [], [], [], 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal tokens
        t0 = time.perf_counter()
        first, count = None, 0
        try:
            with PoEClient(address, timeout=600) as client:
                for chunk in client.stream(token_ids=prompts[i % len(prompts)], max_new_tokens=n):
                    if chunk.token_ids and first is None:
                        first = time.perf_counter() - t0
                    count += len(chunk.token_ids)
        except Exception as exc:  # counted and reported, never fatal to the benchmark
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
            return
        with lock:
            latencies.append(time.perf_counter() - t0)
            ttfts.append(first if first is not None else latencies[-1])
            tokens += count

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(level)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"elapsed": time.perf_counter() - t0, "latencies": latencies, "ttfts": ttfts, "errors": errors,
            "tokens": tokens}


def concurrency_level(address: str, level: int, prompts: list[list[int]], n: int, cluster) -> dict:
    peak_rss = [0]
    stop = threading.Event()

    def watch_memory() -> None:
        while not stop.wait(0.2):
            peak_rss[0] = max(peak_rss[0], sum(cluster.backend.worker_rss()))

    watcher = threading.Thread(target=watch_memory, daemon=True)
    watcher.start()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
        run = clients.submit(stream_clients, address, level, prompts, n).result()
    stop.set()
    watcher.join()
    latencies, ttfts, errors = run["latencies"], run["ttfts"], run["errors"]
    ok = bool(latencies)
    return {
        "concurrency": level, "requests_ok": len(latencies), "errors": len(errors), "first_error": errors[:1],
        "aggregate_tok_s": run["tokens"] / run["elapsed"],
        "latency_p50_s": percentile(latencies, 0.5) if ok else None,
        "latency_p99_s": percentile(latencies, 0.99) if ok else None,
        "ttft_p50_s": percentile(ttfts, 0.5) if ok else None,
        "ttft_p99_s": percentile(ttfts, 0.99) if ok else None,
        "workers_peak_rss_mib": peak_rss[0] / 2**20,
    }


def speculative_and_wand(trained: str, prompts: torch.Tensor, n: int) -> tuple[dict, dict]:
    from coordinator.model import PoEModel

    model = PoEModel.from_pretrained(trained)
    config = model.config
    full_t = spec_t = sampled_t = spec_sampled_t = 0.0
    spec_rates, sampled_rates, agree, total, layers = [], [], 0, 0, []
    layers_at = [b + 1 for b in config.stage_boundaries]
    same = True
    for row in prompts:
        ids = row[None]
        model.generate(ids, 2)  # warm-up of this prompt's shapes
        t0 = time.perf_counter()
        full = model.generate(ids, n)
        full_t += time.perf_counter() - t0
        t0 = time.perf_counter()
        spec, rate = model.generate_speculative(ids, 0, 3, n, return_acceptance=True)
        spec_t += time.perf_counter() - t0
        same &= torch.equal(spec, full)
        spec_rates.append(rate)
        t0 = time.perf_counter()
        model.generate(ids, n, do_sample=True, **CARD_SAMPLING)
        sampled_t += time.perf_counter() - t0
        t0 = time.perf_counter()
        _, rate = model.generate_speculative(ids, 0, 3, n, return_acceptance=True, do_sample=True, **CARD_SAMPLING)
        spec_sampled_t += time.perf_counter() - t0
        sampled_rates.append(rate)
        wand, used = model.generate_wand(ids, n, safety=1.0, return_stages_used=True)
        agree += int((wand[0, -n:] == full[0, -n:]).sum())
        total += n
        layers += [layers_at[s] for s in used[0].tolist()]
    spec = {"checkpoint": trained, "draft_stage": 0, "k_draft": 3, "same_tokens_as_full": same,
            "acceptance": statistics.mean(spec_rates), "speedup": full_t / spec_t,
            "full_tok_s": total / full_t, "speculative_tok_s": total / spec_t,
            "sampled": {**CARD_SAMPLING, "acceptance": statistics.mean(sampled_rates),
                        "speedup": sampled_t / spec_sampled_t}}
    wand = {"checkpoint": trained, "safety": 1.0, "p99_bounds": list(config.wand_p99_bounds or []),
            "token_agreement_with_full": agree / total, "mean_layers_per_token": statistics.mean(layers),
            "layers_full": config.n_layer}
    return spec, wand


def every_mode(cluster, ids: torch.Tensor, n: int) -> dict:
    """Each mode once through `PoEModel.on_ray`: seconds per token, and each worker's memory."""
    config = cluster.config
    runs = {info.name: (info.mode(config, info.example(config.num_stages)), None) for info in MODES.values()}
    runs["sampled"] = (rq.full_mode(config), rq.check_sampling(True, top_k=None, **CARD_SAMPLING))  # the card's example
    cluster.generate(ids, 1)  # warm-up: first-call allocations on every worker
    seconds = {}
    for name, (mode, sampling) in runs.items():  # each mode with the demo's arguments
        t0 = time.perf_counter()
        cluster.run_mode(ids, n, mode, sampling)
        seconds[name] = (time.perf_counter() - t0) / n
    workers = [
        {"stage": info.stage, "replica": r, "layers": list(info.layers), "device": info.device, "dtype": info.dtype,
         "parameters": info.num_parameters, "weights_and_kv_mib": info.resident_bytes / 2**20, "rss_mib": rss / 2**20}
        for (r, info), rss in zip(cluster.replica_infos(), cluster.backend.worker_rss())  # both: every worker, stage by stage
    ]
    return {"prompt_len": int(ids.shape[1]), "new_tokens": n, "s_per_token": seconds, "workers": workers}


def run_bench(cfg: BenchConfig, json_out: str | None = None, plot_out: str | None = None) -> dict:
    from coordinator import PoEModel
    from coordinator.tokenizer import load_tokenizer

    wanted = set(cfg.sections)
    progress = Progress(len(wanted) + (len(cfg.concurrency) - 1 if "concurrency" in wanted else 0), "bench",
                        unit=" sections")
    report: dict = {"bench_config": asdict(cfg), "machine": {
        "platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
        "python": sys.version.split()[0]}}
    config = load_config(cfg.checkpoint)
    ids = prompt_rows(config.vocab_size, 1, cfg.prompt_len, seed=0)

    model = None
    if wanted & {"floor", "single_stream", "layouts"}:
        model = PoEModel.from_pretrained(cfg.checkpoint, dtype=cfg.dtype, device=cfg.device)
        if "floor" in wanted:
            weights = sum(p.nbytes for w in model.workers for p in w.slice.parameters())
            bw = off_main_thread(memory_bandwidth_gbs, cfg.device)  # the main thread stays free of OpenMP
            report["floor"] = {"memory_bandwidth_gbs": bw, "weight_bytes": weights,
                               "single_stream_ceiling_tok_s": bw * 1e9 / weights}
            progress.update(1, note="floor")
    if wanted & {"single_stream", "transport", "concurrency", "modes"}:
        with PoEModel.on_ray(cfg.checkpoint, config=cfg.config, dtype=cfg.dtype) as cluster:
            if "single_stream" in wanted:
                report["single_stream"] = {"checkpoint": cfg.checkpoint, "prompt_len": cfg.prompt_len,
                                           **single_stream_rounds(model, cluster, ids, cfg.decode_tokens, cfg.rounds,
                                                                  progress)}
                progress.update(1, note="single stream")
            if "modes" in wanted:
                report["modes"] = every_mode(cluster, ids, cfg.new_tokens)
                progress.update(1, note="every mode")
            if "transport" in wanted:
                report["transport"] = transport_rounds(config.n_embd, config.vocab_size, cfg.transport_tokens,
                                                       cfg.rounds)
                progress.update(1, note="transport")
            if "concurrency" in wanted:
                report["concurrency"] = concurrency_levels(cfg, cluster, config.vocab_size, progress)
    if "layouts" in wanted:  # its clusters one at a time, after the one above is gone
        report["layouts"] = layout_rounds(model, cfg.checkpoint, cfg.config, cfg.dtype, ids, cfg.decode_tokens,
                                          cfg.rounds, progress)
        progress.update(1, note="layouts")
    if model is not None:
        model.loop.stop()
        del model
    if "prefix_cache" in wanted:
        report["prefix_cache"] = prefix_cache_section(cfg.checkpoint, cfg.dtype, cfg.device)
        progress.update(1, note="prefix cache")

    if "trained" in wanted:
        tok = load_tokenizer(cfg.trained)
        code = [tok.encode(p) for p in CODE_PROMPTS]
        width = min(len(c) for c in code)
        trained_prompts = torch.tensor([c[:width] for c in code])  # (4, width): real code, equal lengths
        report["speculative"], report["wand"] = speculative_and_wand(cfg.trained, trained_prompts, cfg.new_tokens * 2)
        progress.update(1, note="speculative + WAND")

    print(render(report))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2))
    if plot_out and "concurrency" in report:
        plot_concurrency(report, plot_out)
    return report


def concurrency_levels(cfg: BenchConfig, cluster, vocab_size: int, progress: Progress) -> list[dict]:
    from coordinator.grpc_api.server import Server
    from coordinator.tokenizer import load_tokenizer

    server = Server(cluster, load_tokenizer(cfg.checkpoint), port=0, max_queue=max(cfg.concurrency) * 2)
    prompts = [row.tolist() for row in prompt_rows(vocab_size, max(cfg.concurrency), cfg.prompt_len, seed=1)]
    levels = []
    try:
        for level in cfg.concurrency:
            levels.append(concurrency_level(server.address, level, prompts, cfg.new_tokens, cluster))
            progress.update(1, note=f"{level} concurrent")
    finally:
        server.stop()
    single = levels[0]["aggregate_tok_s"] if levels[0]["concurrency"] == 1 else None
    for row in levels:
        row["over_single_stream"] = row["aggregate_tok_s"] / single if single else None
    return levels


def render(r: dict) -> str:
    lines = []
    if "floor" in r:
        f = r["floor"]
        lines.append(f"memory bandwidth {f['memory_bandwidth_gbs']:.1f} GB/s, weights {f['weight_bytes'] / 2**20:.1f} MiB "
                     f"-> single-stream ceiling {f['single_stream_ceiling_tok_s']:.0f} tok/s")
    if "single_stream" in r:
        s = r["single_stream"]
        spread = lambda key: "{:.2f}-{:.2f}".format(*s[f"{key}_spread"])  # noqa: E731
        lines += [
            f"single stream, decode only ({s['decode_tokens']} new tokens, median of {s['rounds']} interleaved rounds), "
            "tok/s:",
            "  PoEModel " + "  ".join(f"{k} {v:.1f}" for k, v in s["poe_model_tok_s"].items())
            + "   on Ray " + "  ".join(f"{k} {v:.1f}" for k, v in s["poe_cluster_tok_s"].items()),
            f"  on Ray / in process: full {s['cluster_over_model_full']:.2f}x ({spread('cluster_over_model_full')}), "
            f"speculative {s['cluster_over_model_speculative']:.2f}x ({spread('cluster_over_model_speculative')}); "
            f"pipeline overhead {s['pipeline_overhead_ms_per_token']:.2f} ms/token",
            f"  stage compute, full: {statistics.median(s['compute_ms_per_token']['model']):.2f} ms/token in process, "
            f"{statistics.median(s['compute_ms_per_token']['cluster']):.2f} in the workers "
            f"({s['compute_cluster_over_model']:.2f}x)",
        ]
    if "modes" in r:
        m = r["modes"]
        lines.append("every mode on Ray (s/token): " + "  ".join(f"{k} {v:.3f}" for k, v in m["s_per_token"].items()))
        lines += [f"  stage {w['stage']} layers {w['layers'][0]}-{w['layers'][1]} {w['dtype']}: {w['parameters'] / 1e6:.1f}M params, "
                  f"weights+KV {w['weights_and_kv_mib']:.0f} MiB, process RSS {w['rss_mib']:.0f} MiB" for w in m["workers"]]
    if "transport" in r:
        t = r["transport"]
        lines.append(f"transport through 4 actors (us/token, median of {t['rounds']}): " + "  ".join(
            f"{k} {v:.0f} ({t['us_per_token_spread'][k][0]:.0f}-{t['us_per_token_spread'][k][1]:.0f})"
            for k, v in t["us_per_token"].items())
            + f"; one hop of the transport: {t['per_hop_us']:.0f} us "
            f"({t['per_hop_us_spread'][0]:.0f}-{t['per_hop_us_spread'][1]:.0f})")
    if "layouts" in r:
        for name, lay in r["layouts"]["layouts"].items():
            lines.append(f"layout {name} single stream, over in process / host ms per token (median of "
                         f"{r['layouts']['rounds']}): " + "  ".join(
                             f"{side} {lay['over_model'][side]:.2f} / {lay['host_ms_per_token'][side]:.2f}"
                             for side in lay["over_model"]))
    if "concurrency" in r:
        lines += ["", f"{'concurrent':>10} {'tok/s':>8} {'x single':>8} {'p50 s':>7} {'p99 s':>7} {'ttft50':>7} "
                      f"{'ttft99':>7} {'errors':>6} {'RSS MiB':>8}"]
        for row in r["concurrency"]:
            fmt = lambda v: f"{v:7.2f}" if v is not None else "      -"  # noqa: E731
            lines.append(f"{row['concurrency']:>10} {row['aggregate_tok_s']:8.1f} {row['over_single_stream'] or 0:8.2f} "
                         f"{fmt(row['latency_p50_s'])} {fmt(row['latency_p99_s'])} {fmt(row['ttft_p50_s'])} "
                         f"{fmt(row['ttft_p99_s'])} {row['errors']:>6} {row['workers_peak_rss_mib']:8.0f}")
    if "prefix_cache" in r:
        lines += ["", *render_prefix_cache(r["prefix_cache"])]
    if "speculative" in r:
        sp, w = r["speculative"], r["wand"]
        lines += [
            "",
            f"speculative (stage 0, k=3, trained): {sp['speedup']:.2f}x full greedy, acceptance {sp['acceptance']:.2f}, "
            f"same tokens: {sp['same_tokens_as_full']}",
            f"speculative sampling (temperature 0.8, top-p 0.95): {sp['sampled']['speedup']:.2f}x full sampling, "
            f"acceptance {sp['sampled']['acceptance']:.2f}",
            f"WAND (safety 1.0, trained): {w['mean_layers_per_token']:.2f} of {w['layers_full']} layers per token, "
            f"agreement with full {w['token_agreement_with_full']:.1%}",
        ]
    return "\n".join(lines)


def plot_concurrency(report: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["concurrency"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["concurrency"] for r in rows], [r["aggregate_tok_s"] for r in rows], "o-", label="on Ray, via gRPC")
    ax.axhline(report["single_stream"]["poe_model_tok_s"]["full"], ls="--", color="gray", label="PoEModel single stream")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("aggregate decode tok/s")
    ax.set_title("poe-serve: throughput against concurrency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
