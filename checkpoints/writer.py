"""Writing PoE checkpoints in the spec's layout: config.json, safetensors (one file or
shards with an index), and a tokenizer. Also the random presets behind `poe-serve
init-checkpoint`. Random weights keep every scalar path active (smear, backout, value-
embedding gates, non-neutral lambdas) so tests exercise all of the trunk's math.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from coordinator.tokenizer import Tokenizer, byte_level_encoding
from stage_workers.checkpoint import INDEX_FILE, SINGLE_FILE, expected_shapes
from stage_workers.compute_thread import off_main_thread
from stage_workers.config import CONFIG_FILE, ModelConfig, config_from_dict
from tools.progress import Progress

PRESETS = {
    # unit tests: 8 layers in 4 stages, GQA, the backout layer inside stage 1
    "tiny": dict(vocab_size=512, n_layer=8, n_embd=64, n_head=4, n_kv_head=2, sequence_len=256,
                 poe_stage_layout=[4, 2, 1, 1]),
    # the card's 24-layer stage layout at a width that decodes quickly on 2 CPU cores
    "small": dict(vocab_size=8192, n_layer=24, n_embd=256, n_head=4, n_kv_head=2, sequence_len=1024,
                  poe_stage_layout=[12, 5, 4, 3]),
    # the card's exact shape: 1,507,591,082 parameters
    "1.5b": dict(vocab_size=48000, n_layer=24, n_embd=1536, n_head=12, n_kv_head=6, sequence_len=2048,
                 poe_stage_layout=[12, 5, 4, 3]),
}
PRESET_SHARD_BYTES = {"tiny": None, "small": None, "1.5b": 1 << 30}
DEFAULT_DTYPE = {"tiny": "fp32", "small": "fp32", "1.5b": "bf16"}
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def preset_config(preset: str, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    return config_from_dict({**PRESETS[preset], "window_pattern": "SSSL", **overrides})


def random_tensors(config: ModelConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Every checkpoint tensor, generated one at a time (fp32) in a fixed order."""
    g = torch.Generator().manual_seed(seed)
    C, L = config.n_embd, config.n_layer
    s = math.sqrt(3.0 / C)  # uniform bound with std 1/sqrt(C)

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    def normal(shape, std):
        return torch.randn(shape, generator=g) * std

    ramp = torch.arange(L) / max(L - 1, 1)
    for name, shape in expected_shapes(config).items():
        if name == "transformer.wte.weight":
            t = normal(shape, 1.0)
        elif name == "lm_head.weight" or name.startswith("lm_head_stages."):
            t = normal(shape, 2.5 / math.sqrt(2 * C))  # stage logits with std ~2.5: clear argmaxes
        elif name.startswith("value_embeds."):
            t = uniform(shape, -s, s)
        elif name.endswith(("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight")):
            t = uniform(shape, -s, s)
        elif name.endswith("attn.c_proj.weight"):
            t = normal(shape, 0.5 / math.sqrt(C))
        elif name.endswith("mlp.c_fc.weight"):
            t = uniform(shape, -0.4 * s, 0.4 * s)
        elif name.endswith("mlp.c_proj.weight"):
            t = normal(shape, 0.5 / math.sqrt(4 * C))
        elif name.endswith("ve_gate.weight"):
            t = uniform(shape, -0.5, 0.5)
        elif name == "resid_lambdas":
            t = 1.15 - 0.10 * ramp + normal(shape, 0.02)
        elif name == "x0_lambdas":
            t = 0.20 - 0.15 * ramp + normal(shape, 0.02)
        elif name == "smear_gate.weight":
            t = uniform(shape, -0.5, 0.5)
        elif name == "smear_lambda":
            t = torch.tensor([0.4])
        elif name == "backout_lambda":
            t = torch.tensor([0.2])
        else:
            raise AssertionError(f"no initialiser for tensor {name}")
        yield name, t


def save_checkpoint(
    directory: str | Path,
    config: ModelConfig,
    tensors: Iterator[tuple[str, torch.Tensor]],
    tokenizer: Tokenizer,
    dtype: str = "fp32",
    max_shard_bytes: int | None = None,
    name_prefix: str = "",
    label: str = "writing checkpoint",
) -> Path:
    """Write config.json, weights and tokenizer.json. Shards when max_shard_bytes is set."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: {', '.join(SAVE_DTYPES)}")
    torch_dtype = SAVE_DTYPES[dtype]
    shapes = expected_shapes(config)
    item = torch.tensor([], dtype=torch_dtype).element_size()
    total = sum(math.prod(s) for s in shapes.values()) * item
    progress = Progress(total / 2**20, label, unit="MiB")
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    names = []
    for name, tensor in tensors:
        t = tensor.to(torch_dtype).contiguous()
        if max_shard_bytes and shard_bytes and shard_bytes + t.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name_prefix + name] = t
        shard_bytes += t.nbytes
        names.append(name)
        progress.update(t.nbytes / 2**20, note=name)
    assert sorted(names) == sorted(shapes), "save_checkpoint got a tensor set that does not match the config"
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=1))
    (directory / CONFIG_FILE).write_text(json.dumps({**config.to_json(), "torch_dtype": dtype}, indent=2))
    tokenizer.save(directory)
    return directory


def init_checkpoint(directory: str | Path, preset: str, seed: int = 0, dtype: str | None = None,
                    max_shard_bytes: int | None = None, name_prefix: str = "", **overrides) -> Path:
    config = preset_config(preset, **overrides)
    tokenizer = Tokenizer(byte_level_encoding(config.vocab_size))
    # drawn off the main thread, which must not own an OpenMP team (stage_workers/compute_thread.py)
    return off_main_thread(
        save_checkpoint, directory, config, random_tensors(config, seed), tokenizer,
        dtype=dtype or DEFAULT_DTYPE[preset],
        max_shard_bytes=max_shard_bytes if max_shard_bytes is not None else PRESET_SHARD_BYTES[preset],
        name_prefix=name_prefix,
        label=f"init {preset}",
    )
