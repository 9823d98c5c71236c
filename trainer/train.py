"""`poe-serve train`: build the embedded default checkpoint from nothing but the Python stdlib.

One seeded command: train the tokenizer, train the model for a fixed number of steps with
the residual Log-OP objective (trainer/model.py), save it as a spec checkpoint in bf16,
calibrate WAND on the calibration split, evaluate on the eval split and write the model card
with a loss-curve plot. Progress is shown throughout. This module knows the recipe, not the math.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from checkpoints.writer import save_checkpoint
from stage_workers.config import config_from_dict
from tools.progress import Progress

from .data import encode_documents, read_split, train_tokenizer
from .model import TrainablePoE


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str
    seed: int = 0
    steps: int = 1000
    batch_size: int = 4  # sequences per step
    vocab_size: int = 4096
    n_layer: int = 12
    poe_stage_layout: tuple[int, ...] = (6, 3, 2, 1)  # the card's [12, 5, 4, 3] scaled to 12 layers
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    sequence_len: int = 512
    local_weight: float = 0.0  # weight of each later stage's own CE (trainer/model.py)
    lr: float = 3e-3
    warmup_steps: int = 50
    final_lr_frac: float = 0.1
    eval_every: int = 100
    compile: bool = True  # torch.compile the loss (about 1.4x on 2 CPU cores, after a ~3 min compile)
    threads: int | None = None
    extra: dict = field(default_factory=dict)

    def model_config(self):
        return config_from_dict(dict(
            vocab_size=self.vocab_size, n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head,
            n_kv_head=self.n_kv_head, sequence_len=self.sequence_len, poe_stage_layout=list(self.poe_stage_layout),
            window_pattern="SSSL",
        ))


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def batches(stream: np.ndarray, batch_size: int, T: int, generator: torch.Generator):
    """Endless random windows of T+1 tokens: (inputs (B, T), targets (B, T))."""
    data = torch.from_numpy(stream.astype(np.int64))
    while True:
        starts = torch.randint(0, len(data) - T - 1, (batch_size,), generator=generator)
        rows = torch.stack([data[s : s + T + 1] for s in starts.tolist()])
        yield rows[:, :-1], rows[:, 1:]


def train(cfg: TrainConfig) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()

    print("1/4 tokenizer: training BPE on the stdlib train split", flush=True)
    train_texts = read_split("train")
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    train_stream = encode_documents(tokenizer, train_texts)
    eval_stream = encode_documents(tokenizer, read_split("eval"))
    print(f"    {len(train_stream):,} train tokens, {len(eval_stream):,} eval tokens", flush=True)

    print(f"2/4 model: {cfg.steps} steps of {cfg.batch_size}x{cfg.sequence_len} tokens", flush=True)
    config = cfg.model_config()
    model = TrainablePoE(config)
    model.init_weights(torch.Generator().manual_seed(cfg.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    loss = functools.partial(model.loss, local_weight=cfg.local_weight)
    loss_fn = torch.compile(loss) if cfg.compile else loss
    data = batches(train_stream, cfg.batch_size, cfg.sequence_len, torch.Generator().manual_seed(cfg.seed + 1))
    eval_data = batches(eval_stream, 8, cfg.sequence_len, torch.Generator().manual_seed(cfg.seed + 2))
    eval_batches = [next(eval_data) for _ in range(4)]
    log = []
    progress = Progress(cfg.steps, "train", unit=" steps")
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        inputs, targets = next(data)
        loss, local = loss_fn(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step, "loss": loss.item(), **{f"stage{k}": v for k, v in enumerate(local.tolist())}}
        if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
            with torch.no_grad():
                row["eval_loss"] = sum(float(loss_fn(i, t)[0]) for i, t in eval_batches) / len(eval_batches)
        log.append(row)
        progress.update(1, note=f"loss {row['loss']:.3f}" + (f" eval {row['eval_loss']:.3f}" if "eval_loss" in row else ""))

    print("3/4 saving the checkpoint (bf16)", flush=True)
    with torch.no_grad():
        tensors = ((name, t.detach().clone()) for name, t in model.checkpoint_tensors())
        save_checkpoint(out, config, tensors, tokenizer, dtype="bf16", label="save")
    write_log(out, log)
    meta = {"train_config": {k: v for k, v in asdict(cfg).items() if k != "out_dir"},
            "train_tokens_seen": cfg.steps * cfg.batch_size * cfg.sequence_len,
            "train_seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(meta, indent=2))

    print("4/4 calibrating WAND and evaluating", flush=True)
    from .evaluate import evaluate_and_write_card

    evaluate_and_write_card(out, train_stream)
    print(f"done in {time.perf_counter() - started:.0f}s -> {out}", flush=True)
    return out


def write_log(out: Path, log: list[dict]) -> None:
    keys = sorted({k for row in log for k in row}, key=lambda k: (k != "step", k))
    with open(out / "training_log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(log)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping loss_curve.png", flush=True)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in log]
    width = min(20, len(log))
    smooth = np.convolve([r["loss"] for r in log], np.ones(width) / width, mode="valid")
    ax.plot(steps[len(steps) - len(smooth):], smooth, label="train loss (20-step mean)")
    evals = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("residual Log-OP loss (nats)")
    ax.set_title("poe-serve default checkpoint: training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=110)
