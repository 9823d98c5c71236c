"""Calibrate WAND and measure a trained checkpoint through the serving code, then write its card.

Everything is measured with `PoEModel` on the saved checkpoint: teacher-forced bits per byte
(full PoE, each stage, a unigram baseline), accuracy, stage agreement and WAND's exit rule on
every eval position; then free-running generation for WAND agreement and speculative
acceptance. Nothing here trains.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from coordinator import PoEModel, load_tokenizer
from stage_workers.config import CONFIG_FILE
from stage_workers.decisions import wand_exits as clear_margins
from stage_workers.decisions import wand_threshold
from stage_workers.logop import combine, log_probs, normalize

from .data import encode_documents, read_split

NUM_WINDOWS = 24  # per split: 24 x 512 positions
CODE_PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main():\n", "class Stack:\n    def __init__(self):\n"]


def windows(stream: np.ndarray, length: int, count: int) -> list[list[int]]:
    stride = max((len(stream) - length) // count, 1)
    return [stream[i * stride : i * stride + length].astype(np.int64).tolist() for i in range(count)]


def byte_lengths(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.num_bytes(i) for i in range(tokenizer.vocab_size)], dtype=torch.float64)


def wand_exits(lps: list[torch.Tensor], bounds: list[float], alpha: float, safety: float = 1.0):
    """WAND at every position at once, by the serving rule (stage_workers/decisions.py, which the
    exiting stage's worker runs). lps: K x (T, V) stage log-probs -> (T,) exit stage and (T,) the
    token emitted there."""
    K = len(lps)
    exit_stage = torch.full(lps[0].shape[:-1], -1, dtype=torch.long)
    token = torch.zeros_like(exit_stage)
    for j in range(K):
        score = combine(lps[: j + 1], [1.0] * (j + 1), alpha)  # (T, V)
        threshold = torch.full(score.shape[:-1], wand_threshold(bounds[j], safety))
        clears = torch.ones_like(threshold, dtype=torch.bool) if j == K - 1 else clear_margins(score, threshold)
        now = (exit_stage < 0) & clears
        exit_stage[now], token[now] = j, score.argmax(-1)[now]
    return exit_stage, token


def teacher_forced(model: PoEModel, tokenizer, rows: list[list[int]], train_stream: np.ndarray) -> dict:
    config = model.config
    K, alpha = config.num_stages, config.poe_alpha
    bounds = config.wand_p99_bounds
    nbytes = byte_lengths(tokenizer)
    unigram = torch.log(torch.bincount(torch.from_numpy(train_stream.astype(np.int64)), minlength=config.vocab_size).double() + 1)
    unigram -= torch.logsumexp(unigram, 0)
    nats = {name: 0.0 for name in ["full", "unigram", *[f"stage{k}" for k in range(K)]]}
    total_bytes = correct = agree_last2 = wand_agree = wand_layers = positions = 0
    exit_counts = [0] * K
    layers_at = [b + 1 for b in config.stage_boundaries]
    for row, logits in zip(rows, model.stage_logits(rows, tuple(range(K)))):
        targets = torch.tensor(row[1:])
        counted = nbytes[targets] > 0
        lps = [log_probs(logits[k][:-1]) for k in range(K)]  # K x (T-1, V)
        full = combine(lps, [1.0] * K, alpha)
        pick = lambda lp: lp.gather(1, targets[:, None])[:, 0][counted].double().sum().item()  # noqa: E731
        nats["full"] -= pick(normalize(full))
        nats["unigram"] -= unigram[targets][counted].sum().item()
        for k in range(K):
            nats[f"stage{k}"] -= pick(lps[k])
        total_bytes += nbytes[targets].sum().item()
        full_top = full.argmax(-1)
        correct += (full_top == targets).sum().item()
        agree_last2 += (lps[K - 2].argmax(-1) == lps[K - 1].argmax(-1)).sum().item()
        exit_stage, wand_top = wand_exits(lps, bounds, alpha)
        wand_agree += (wand_top == full_top).sum().item()
        for j in range(K):
            wand_layers += (exit_stage == j).sum().item() * layers_at[j]
            exit_counts[j] += (exit_stage == j).sum().item()
        positions += len(targets)
    bpb = {k: v / math.log(2) / total_bytes for k, v in nats.items()}
    return {
        "positions": positions,
        "bpb": bpb,
        "full_accuracy": correct / positions,
        "last_two_stage_agreement": agree_last2 / positions,
        "wand_agreement": wand_agree / positions,
        "wand_mean_layers": wand_layers / positions,
        "wand_exit_fraction": [e / positions for e in exit_counts],
    }


def free_running(model: PoEModel, prompts: list[list[int]], max_new_tokens: int = 48) -> dict:
    t0 = time.perf_counter()
    full = model.generate(prompts, max_new_tokens)
    t_full = time.perf_counter() - t0
    wand, used = model.generate_wand(prompts, max_new_tokens, return_stages_used=True)
    t0 = time.perf_counter()
    spec, rates = model.generate_speculative(prompts, 0, 3, max_new_tokens, return_acceptance=True)
    t_spec = time.perf_counter() - t0
    layers_at = torch.tensor([b + 1 for b in model.config.stage_boundaries])
    rates = rates if isinstance(rates, list) else [rates]
    return {
        "prompts": len(prompts),
        "new_tokens_per_prompt": max_new_tokens,
        "wand_token_agreement": (wand == full).float()[:, -max_new_tokens:].mean().item(),
        "wand_mean_layers": layers_at[used].float().mean().item(),
        "speculative_equals_full": bool(torch.equal(spec, full)),
        "speculative_acceptance": sum(rates) / len(rates),
        "speculative_speedup_batched": t_full / t_spec,
    }


def evaluate_and_write_card(out: Path, train_stream: np.ndarray) -> dict:
    tokenizer = load_tokenizer(out)
    model = PoEModel.from_pretrained(out)
    T = model.config.sequence_len
    calib = windows(encode_documents(tokenizer, read_split("calib")), T, NUM_WINDOWS)
    bounds = model.calibrate_wand(calib, quantile=0.99)
    raw = json.loads((out / CONFIG_FILE).read_text())
    raw["wand_p99_bounds"] = bounds
    (out / CONFIG_FILE).write_text(json.dumps(raw, indent=2))
    model = PoEModel.from_pretrained(out)  # now with the calibrated bounds

    eval_rows = windows(encode_documents(tokenizer, read_split("eval")), T, NUM_WINDOWS)
    metrics = {"wand_p99_bounds": bounds, "teacher_forced": teacher_forced(model, tokenizer, eval_rows, train_stream)}
    prompts = [row[:64] for row in eval_rows[:8]]
    metrics["free_running"] = free_running(model, prompts)
    samples = {}
    for prompt in CODE_PROMPTS:
        ids = tokenizer.encode(prompt)
        samples[prompt] = tokenizer.decode(model.generate(ids, 48)[0, len(ids):])
    metrics["samples"] = samples
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "README.md").write_text(model_card(model, metrics, json.loads((out / "training.json").read_text())))
    return metrics


def model_card(model: PoEModel, m: dict, training: dict) -> str:
    c, tf, fr = model.config, m["teacher_forced"], m["free_running"]
    bpb = tf["bpb"]
    stage_bpb = " / ".join(f"{bpb[f'stage{k}']:.4f}" for k in range(c.num_stages))
    samples = "\n\n".join(f"```python\n{p}{s}\n```" for p, s in m["samples"].items())
    tcfg = training["train_config"]
    return f"""# poe-serve default checkpoint (PoE, {c.num_parameters():,} parameters)

A small Product-of-Experts model of the Cognica-PoE architecture, trained on 2 CPU cores with
the residual Log-OP local-learning objective (see `trainer/model.py`) on the Python standard
library's own source. It is the default of `poe-serve demo`, `generate` and the WAND and
speculation figures of `bench`. It is a toy: it writes Python-looking code, nothing more.

## Architecture

| | |
|---|---|
| layers / width / heads (kv) | {c.n_layer} / {c.n_embd} / {c.n_head} ({c.n_kv_head}) |
| PoE stage layout | {list(c.poe_stage_layout)} (the card's [12, 5, 4, 3] scaled), boundaries {list(c.stage_boundaries)} |
| vocabulary | {c.vocab_size} BPE tokens (nanochat split pattern and special tokens) |
| context | {c.sequence_len}, window pattern {c.window_pattern} |
| weights | bf16 safetensors |
| WAND p99 bounds | {[round(b, 4) for b in m['wand_p99_bounds']]} (calibrated on the calib split) |

## Training

`poe-serve train --out checkpoints/default --seed {tcfg['seed']}`: {tcfg['steps']} steps x {tcfg['batch_size']} x
{tcfg['sequence_len']} tokens ({training['train_tokens_seen']:,} tokens seen) with AdamW, lr {tcfg['lr']}, in
{training['train_seconds'] / 60:.0f} minutes on 2 CPU cores (torch {training['torch']}). Data: the stdlib `.py` files, split by
a hash of their name into train (96%), calib (2%) and eval (2%). Loss curve: `loss_curve.png`.

## Validation (eval split, {tf['positions']:,} teacher-forced positions)

| metric | value |
|---|---|
| full/geomean BPB | {bpb['full']:.4f} |
| stage BPB (s0 / s1 / s2 / s3) | {stage_bpb} |
| unigram baseline BPB | {bpb['unigram']:.4f} |
| full next-token accuracy | {tf['full_accuracy']:.4f} |
| s{c.num_stages - 2}-s{c.num_stages - 1} top-1 agreement | {tf['last_two_stage_agreement']:.4f} |
| WAND (safety 1.0) agreement with full PoE | {tf['wand_agreement']:.4f} |
| WAND mean evaluated layers per token | {tf['wand_mean_layers']:.2f} of {c.n_layer} |
| WAND exits per stage | {[round(x, 3) for x in tf['wand_exit_fraction']]} |

Free-running, {fr['prompts']} eval prompts x {fr['new_tokens_per_prompt']} new tokens (greedy):

| metric | value |
|---|---|
| WAND token agreement with full PoE | {fr['wand_token_agreement']:.4f} |
| WAND mean evaluated layers per token | {fr['wand_mean_layers']:.2f} of {c.n_layer} |
| speculative (stage-0 drafts, k=3) acceptance | {fr['speculative_acceptance']:.4f} |
| speculative output identical to full greedy | {fr['speculative_equals_full']} |

## Samples (full PoE, greedy)

{samples}
"""
