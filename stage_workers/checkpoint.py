"""Reading a PoE checkpoint's safetensors one tensor at a time.

`CheckpointReader` indexes a single `model.safetensors` or the shards named by
`model.safetensors.index.json`, strips one common name prefix (such as `model.`), checks every
tensor's name, shape and dtype from the file headers alone, and reads only the tensors asked
for. A stage worker therefore touches just its slice of the weights. It knows nothing about
what the tensors mean beyond their names and shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import SMEAR_CHANNELS, VE_GATE_CHANNELS, ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ANCHOR = "lm_head.weight"  # present in every checkpoint; locates the common prefix
ALLOWED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def padded_vocab(vocab_size: int) -> int:
    """nanochat pads vocab rows to a multiple of 64; such checkpoints are accepted and cropped."""
    return -(-vocab_size // 64) * 64


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint must hold, by canonical (prefix-free) name."""
    C, V, kv = config.n_embd, config.vocab_size, config.kv_dim
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (V, C),
        "lm_head.weight": (V, C),
        "resid_lambdas": (config.n_layer,),
        "x0_lambdas": (config.n_layer,),
        "smear_gate.weight": (1, SMEAR_CHANNELS),
        "smear_lambda": (1,),
        "backout_lambda": (1,),
    }
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        shapes[p + "attn.c_q.weight"] = (config.n_head * config.head_dim, C)
        shapes[p + "attn.c_k.weight"] = (kv, C)
        shapes[p + "attn.c_v.weight"] = (kv, C)
        shapes[p + "attn.c_proj.weight"] = (C, C)
        shapes[p + "mlp.c_fc.weight"] = (4 * C, C)
        shapes[p + "mlp.c_proj.weight"] = (C, 4 * C)
        if config.has_value_embed(i):
            shapes[p + "attn.ve_gate.weight"] = (config.n_kv_head, VE_GATE_CHANNELS)
            shapes[f"value_embeds.{i}.weight"] = (V, kv)
    for k in range(config.num_stages):
        shapes[f"lm_head_stages.{k}.weight"] = (V, C)
    return shapes


def is_vocab_tensor(name: str) -> bool:
    """Tensors with one row per token id."""
    return name in ("transformer.wte.weight", "lm_head.weight") or name.startswith(
        ("value_embeds.", "lm_head_stages.")
    )


def _vocab_rows_ok(name: str, shape: tuple[int, ...], want: tuple[int, ...], vocab: int) -> bool:
    return is_vocab_tensor(name) and shape[1:] == want[1:] and shape[0] == padded_vocab(vocab)


class CheckpointReader:
    """Validated, lazy access to a checkpoint's tensors. Use as a context manager."""

    def __init__(self, checkpoint_dir: str | Path, config: ModelConfig):
        self.dir = Path(checkpoint_dir)
        self.config = config
        self._files: dict[str, object] = {}  # open safe_open handles, by file name
        stored = self._stored_names()  # stored name -> file name
        self.prefix = self._find_prefix(stored)
        self.file_of = {name[len(self.prefix):]: f for name, f in stored.items()}
        self._check_names_and_shapes()

    # ---- index -----------------------------------------------------------------------------
    def _stored_names(self) -> dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{index}: expected a JSON object with a 'weight_map' ({exc})") from None
            for name, file in weight_map.items():
                if not (self.dir / file).is_file():
                    raise FileNotFoundError(f"{index} maps tensor {name!r} to missing shard {file}")
            for file in sorted(set(weight_map.values())):
                in_file = set(self._handle(file).keys())
                listed = {n for n, f in weight_map.items() if f == file}
                if listed - in_file:
                    name = sorted(listed - in_file)[0]
                    raise ValueError(f"{index} lists tensor {name!r} in {file}, but that shard lacks it")
            return dict(weight_map)
        if (self.dir / SINGLE_FILE).is_file():
            return {name: SINGLE_FILE for name in self._handle(SINGLE_FILE).keys()}
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in checkpoint directory {self.dir}")

    def _find_prefix(self, stored: dict[str, str]) -> str:
        anchors = [n for n in stored if n == ANCHOR or n.endswith("." + ANCHOR)]
        if not anchors:
            raise ValueError(f"checkpoint {self.dir} is missing tensor {ANCHOR!r}")
        prefix = min(anchors, key=len)[: -len(ANCHOR)]
        outside = sorted(n for n in stored if not n.startswith(prefix))
        if outside:
            raise ValueError(
                f"checkpoint {self.dir}: unexpected tensor {outside[0]!r} "
                f"(all names must share the prefix {prefix!r} found on {prefix + ANCHOR!r})"
            )
        return prefix

    def _check_names_and_shapes(self) -> None:
        want = expected_shapes(self.config)
        missing = sorted(set(want) - set(self.file_of))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"checkpoint {self.dir} is missing tensor {self.prefix + missing[0]!r}{more}")
        unexpected = sorted(set(self.file_of) - set(want))
        if unexpected:
            raise ValueError(
                f"checkpoint {self.dir} has unexpected tensor {self.prefix + unexpected[0]!r} "
                f"for a config with n_layer={self.config.n_layer}, "
                f"{self.config.num_stages} stages"
            )
        for name, shape in want.items():
            file = self.file_of[name]
            view = self._handle(file).get_slice(self.prefix + name)
            got, dtype = tuple(view.get_shape()), view.get_dtype()
            if got != shape and not _vocab_rows_ok(name, got, shape, self.config.vocab_size):
                raise ValueError(
                    f"tensor {self.prefix + name!r} in {self.dir / file} has shape {list(got)}, "
                    f"expected {list(shape)} for this config.json"
                )
            if dtype not in ALLOWED_DTYPES:
                raise ValueError(
                    f"tensor {self.prefix + name!r} in {self.dir / file} has dtype {dtype}; "
                    f"allowed: {', '.join(ALLOWED_DTYPES)}"
                )

    # ---- reading ---------------------------------------------------------------------------
    def _handle(self, file: str):
        if file not in self._files:
            path = self.dir / file
            try:
                self._files[file] = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for bad files
                raise ValueError(f"cannot read safetensors file {path}: {exc}") from None
        return self._files[file]

    def read(self, name: str) -> torch.Tensor:
        """One tensor by canonical name, vocab rows cropped, checked to be finite."""
        file = self.file_of[name]
        try:
            tensor = self._handle(file).get_tensor(self.prefix + name)
        except Exception as exc:
            raise ValueError(f"cannot read tensor {self.prefix + name!r} from {self.dir / file}: {exc}") from None
        if is_vocab_tensor(name):  # crop nanochat's padded vocab rows
            tensor = tensor[: self.config.vocab_size]
        if not torch.isfinite(tensor).all():
            raise ValueError(f"tensor {self.prefix + name!r} in {self.dir / file} contains NaN or Inf")
        return tensor

    def close(self) -> None:
        self._files.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
