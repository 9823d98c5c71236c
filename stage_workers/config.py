"""The model's shape and PoE constants, read once from a checkpoint's `config.json`.

`ModelConfig` is the one place that knows the spec's config keys, their Hugging Face aliases
and defaults, and the numbers derived from them (stage boundaries, per-layer windows). It
knows nothing about weights, devices or requests.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONFIG_FILE = "config.json"
WAND_BOUNDS_FILE = "wand_bounds.json"  # written by `poe-serve calibrate`, read by `load_config`

HF_ALIASES = {
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "num_key_value_heads": "n_kv_head",
    "max_position_embeddings": "sequence_len",
}
REQUIRED_KEYS = ("vocab_size", "n_layer", "n_embd", "n_head", "sequence_len", "poe_stage_layout")
VE_GATE_CHANNELS = 12  # value-embedding gate reads the first 12 channels of the normed input
SMEAR_CHANNELS = 24  # smear gate reads the first 24 channels of the embedding


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    sequence_len: int  # context limit: positions 0..sequence_len-1
    poe_stage_layout: tuple[int, ...]  # layers per stage, e.g. (12, 5, 4, 3)
    window_pattern: str = "SSSL"  # tiled over layers; last layer always L
    poe_alpha: float = 0.0  # Log-OP shrinkage: 0 gives the card's geometric mean
    logit_softcap: float = 15.0
    rope_base: float = 100000.0
    # (ours) short sliding window; None derives nanochat's ceil(sequence_len/4/128)*128
    short_window: int | None = None
    wand_p99_bounds: tuple[float, ...] | None = None  # one per stage, from calibration
    source: str = field(default="", compare=False)  # where it was read, for error messages

    def __post_init__(self):
        where = f" in {self.source}" if self.source else ""

        def bad(key, allowed):
            return ValueError(f"config.json{where}: {key}={getattr(self, key)!r} is invalid; {allowed}")

        for key in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "sequence_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(key, "expected a positive integer")
        if self.n_embd % self.n_head:
            raise bad("n_embd", f"must be divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise bad("n_embd", "n_embd/n_head (head_dim) must be even for rotary embeddings")
        if self.n_head % self.n_kv_head:
            raise bad("n_kv_head", f"must divide n_head={self.n_head}")
        if self.n_embd < SMEAR_CHANNELS:
            raise bad("n_embd", f"must be at least {SMEAR_CHANNELS} (the smear gate's input width)")
        if not self.poe_stage_layout or any(
            not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.poe_stage_layout
        ):
            raise bad("poe_stage_layout", "expected a non-empty list of positive layer counts")
        if sum(self.poe_stage_layout) != self.n_layer:
            raise bad("poe_stage_layout", f"its layer counts must sum to n_layer={self.n_layer}")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise bad("window_pattern", "expected a non-empty string of 'S' and 'L'")
        for key in ("poe_alpha", "logit_softcap", "rope_base"):
            if not math.isfinite(getattr(self, key)):
                raise bad(key, "expected a finite number")
        if self.logit_softcap <= 0 or self.rope_base <= 0:
            raise bad("logit_softcap" if self.logit_softcap <= 0 else "rope_base", "must be > 0")
        if self.short_window is not None and self.short_window < 1:
            raise bad("short_window", "expected a positive integer or null")
        if self.wand_p99_bounds is not None and (
            len(self.wand_p99_bounds) != self.num_stages
            or not all(math.isfinite(b) and b >= 0 for b in self.wand_p99_bounds)
        ):
            raise bad("wand_p99_bounds", f"expected {self.num_stages} finite numbers >= 0, one per stage")

    # ---- derived numbers -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def num_stages(self) -> int:
        return len(self.poe_stage_layout)

    @property
    def stage_boundaries(self) -> tuple[int, ...]:
        """Last layer of each stage: cumulative layout minus one, e.g. (11, 16, 20, 23)."""
        ends = []
        for n in self.poe_stage_layout:
            ends.append((ends[-1] if ends else -1) + n)
        return tuple(ends)

    def stage_layers(self, stage: int) -> range:
        """The contiguous layers a stage's slice owns."""
        end = self.stage_boundaries[stage]
        return range(end - self.poe_stage_layout[stage] + 1, end + 1)

    @property
    def backout_layer(self) -> int:
        return self.n_layer // 2

    def has_value_embed(self, layer: int) -> bool:
        return layer % 2 == (self.n_layer - 1) % 2

    @property
    def resolved_short_window(self) -> int:
        if self.short_window is not None:
            return self.short_window
        return math.ceil(self.sequence_len / 4 / 128) * 128

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Left window per layer: key j is visible to query i iff j <= i and i - j <= window."""
        pattern = self.window_pattern.upper()
        sizes = {"L": self.sequence_len, "S": self.resolved_short_window}
        windows = [sizes[pattern[i % len(pattern)]] for i in range(self.n_layer)]
        windows[-1] = self.sequence_len
        return tuple(windows)

    def num_parameters(self) -> int:
        C, V, kv = self.n_embd, self.vocab_size, self.kv_dim
        per_layer = 10 * C * C + 2 * C * kv
        num_ve = sum(self.has_value_embed(i) for i in range(self.n_layer))
        scalars = 2 * self.n_layer + SMEAR_CHANNELS + 2  # resid/x0 lambdas, smear gate/lambda, backout
        return (
            self.n_layer * per_layer
            + num_ve * (self.n_kv_head * VE_GATE_CHANNELS + V * kv)
            + V * C * (2 + self.num_stages)  # wte, lm_head, one head per stage
            + scalars
        )

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("source")
        out["poe_stage_layout"] = list(self.poe_stage_layout)
        if self.wand_p99_bounds is None:
            out.pop("wand_p99_bounds")
        else:
            out["wand_p99_bounds"] = list(self.wand_p99_bounds)
        if self.short_window is None:
            out.pop("short_window")
        return out


def config_from_dict(raw: dict, source: str = "") -> ModelConfig:
    """Canonical keys win over HF aliases; unknown keys are ignored."""
    values = {}
    for key, value in raw.items():
        canonical = HF_ALIASES.get(key, key)
        if canonical in values and key in HF_ALIASES:
            continue
        values[canonical] = value
    where = f" ({source})" if source else ""
    missing = [k for k in REQUIRED_KEYS if k not in values]
    if missing:
        aliases = {v: k for k, v in HF_ALIASES.items()}
        named = [f"{k}" + (f" (or {aliases[k]})" if k in aliases else "") for k in missing]
        raise ValueError(f"config.json{where} is missing required key(s): {', '.join(named)}")
    known = {f for f in ModelConfig.__dataclass_fields__ if f != "source"}
    kwargs = {k: v for k, v in values.items() if k in known}
    kwargs.setdefault("n_kv_head", kwargs["n_head"])
    try:
        kwargs["poe_stage_layout"] = tuple(kwargs["poe_stage_layout"])
        for key in ("poe_alpha", "logit_softcap", "rope_base"):
            if key in kwargs:
                kwargs[key] = float(kwargs[key])
        if kwargs.get("wand_p99_bounds") is not None:
            kwargs["wand_p99_bounds"] = tuple(float(b) for b in kwargs["wand_p99_bounds"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config.json{where}: malformed value ({exc})") from None
    return ModelConfig(**kwargs, source=source)


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read `config.json`, then let a calibration file beside it override `wand_p99_bounds`."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in checkpoint directory {checkpoint_dir}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    bounds_path = Path(checkpoint_dir) / WAND_BOUNDS_FILE
    if bounds_path.is_file():
        raw["wand_p99_bounds"] = json.loads(bounds_path.read_text())["wand_p99_bounds"]
    return config_from_dict(raw, source=str(path))
