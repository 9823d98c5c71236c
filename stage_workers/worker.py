"""`StageWorker`: one stage's slice of the trunk, its head and its KV cache, without Ray.

The worker interface is four verbs: `extend` a batch of sequences by new positions (prefill,
decode, catch-up and verification are all extends), returning the boundary state for the next
stage and this stage's logits where asked; `rollback` a sequence to a length; `free` it; and
`info`. Prefix caching adds three on KV blocks: `keep` a sequence's full block under the
coordinator's block id, `share` kept blocks as a new sequence's first positions, `evict` one.
The in-process engine and the Ray actor both call exactly these. The worker knows nothing
about modes, Log-OP, hashes or other workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import CacheAttention
from .checkpoint import CheckpointReader
from .compute_thread import step_threads, use_threads
from .config import ModelConfig, load_config
from .decode_graphs import DecodeGraphs
from .kv_cache import KVCacheFull, PagedKVCache
from .memory import device_memory, kv_tokens_for_memory
from .messages import ExtendBatch, ExtendResult, WorkerInfo, require
from .stage_slice import StageSlice, load_stage_slice
from .step_inputs import StepInputs
from .trunk import rotary_tables

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_dtype(name: str | torch.dtype | None, device: str) -> torch.dtype:
    """None picks bf16 on CUDA and fp32 elsewhere (CPU bf16 matmuls are slow without AVX512)."""
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    key = DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; allowed: {', '.join([*DTYPES, *DTYPE_ALIASES])}")
    return DTYPES[key]


@dataclass(frozen=True)
class WorkerSpec:
    """Where and how one stage worker runs; built from the serving config."""

    stage: int
    device: str = "cpu"
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on CPU
    kv_cache_tokens: int | None = None  # KV pool size in positions; None: from memory_fraction, else 8 * sequence_len
    memory_fraction: float | None = None  # share of the device's memory for weights + KV (stage_workers/memory.py)
    kv_block_size: int = 16
    num_threads: int | None = None  # most torch threads of a CPU worker (small steps use one: compute_thread.py); None: default
    shares_cores: bool = True  # other workers compute on this node's cores between its steps: small steps use one thread
    cuda_graphs: bool | None = None  # decode steps as CUDA graphs per batch bucket; None: on for a CUDA device


class StageWorker:
    def __init__(self, config: ModelConfig, spec: WorkerSpec, stage_slice: StageSlice):
        self.config, self.spec, self.stage = config, spec, spec.stage
        self.device = torch.device(spec.device)
        self.dtype = resolve_dtype(spec.dtype, spec.device)
        self.slice = stage_slice
        self.busy_s = 0.0  # seconds its step runner spent computing and deciding (stage utilization)
        self.largest_weight = 4 * config.n_embd * config.n_embd  # the MLP's matmuls: what sets a step's threads
        tokens = spec.kv_cache_tokens or self._tokens_from_memory() or 8 * config.sequence_len
        self.cache = PagedKVCache(
            num_layers=len(stage_slice.layers),
            num_blocks=-(-tokens // spec.kv_block_size),
            block_size=spec.kv_block_size,
            n_kv_head=config.n_kv_head,
            head_dim=config.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.cos, self.sin = rotary_tables(config, self.dtype, self.device)  # (sequence_len, D/2)
        use_graphs = spec.cuda_graphs if spec.cuda_graphs is not None else self.device.type == "cuda"
        # on the CPU the bucketed step runs eagerly (there is nothing to capture): what the tests exercise
        self.decode_graphs = DecodeGraphs(self, capture=self.device.type == "cuda") if use_graphs else None

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, spec: WorkerSpec) -> "StageWorker":
        """Read config.json and only this stage's tensors."""
        config = load_config(checkpoint_dir)
        if not 0 <= spec.stage < config.num_stages:
            raise ValueError(f"stage {spec.stage} is out of range; the checkpoint has stages 0..{config.num_stages - 1}")
        dtype = resolve_dtype(spec.dtype, spec.device)
        with CheckpointReader(checkpoint_dir, config) as reader:
            stage_slice = load_stage_slice(reader, spec.stage, dtype, spec.device)
        return cls(config, spec, stage_slice)

    # ---- the worker interface --------------------------------------------------------------
    @torch.inference_mode()
    def extend(self, batch: ExtendBatch) -> ExtendResult:
        self._check(batch)
        if self.spec.num_threads and self.device.type == "cpu":
            most = self.spec.num_threads
            use_threads(step_threads(batch.token_ids.shape[0], self.largest_weight, most) if self.spec.shares_cores
                        else most)
        old = {seg.seq_id: self.cache.length(seg.seq_id) for seg in batch.segments}
        for seg in batch.segments:
            self.cache.reserve(seg.seq_id, seg.start + seg.length)
        try:
            if self.decode_graphs is not None and self.decode_graphs.fits(batch):
                return self.decode_graphs.run(batch)  # one graph launch per decode step
            inputs = StepInputs.build(batch, self.cache).to(self.device)  # one non-blocking copy
            trunk = None if batch.trunk is None else batch.trunk.to(self.device, self.dtype)
            attention = CacheAttention(self.cache, batch.segments, inputs, self.slice.windows, self.config.n_head)
            pos = inputs.positions  # (N,)
            return self.slice(inputs, trunk, attention, self.cos[pos], self.sin[pos])
        except BaseException:
            for seq_id, length in old.items():
                self.cache.truncate(seq_id, length)
            raise

    def rollback(self, seq_id: int, length: int) -> None:
        self.cache.truncate(seq_id, length)

    def free(self, seq_id: int) -> None:
        self.cache.free(seq_id)

    def keep(self, block_id: int, seq_id: int, index: int) -> None:
        self.cache.keep(block_id, seq_id, index)

    def share(self, seq_id: int, block_ids: list[int]) -> None:
        self.cache.share(seq_id, block_ids)

    def evict(self, block_id: int) -> None:
        self.cache.evict(block_id)

    def info(self) -> WorkerInfo:
        params = sum(p.numel() for p in self.slice.parameters())
        weight_bytes = sum(p.nbytes for p in self.slice.parameters())
        return WorkerInfo(
            stage=self.stage,
            layers=(self.slice.layer_ids[0], self.slice.layer_ids[-1]),
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            num_parameters=params,
            kv_block_size=self.cache.block_size,
            kv_num_blocks=self.cache.num_blocks,
            kv_free_blocks=self.cache.num_free_blocks,
            resident_bytes=weight_bytes + self.cache.nbytes,
            busy_s=self.busy_s,
        )

    # ---- helpers ---------------------------------------------------------------------------
    def _tokens_from_memory(self) -> int | None:
        """KV positions that fit the spec's memory_fraction of the device, after this slice's weights."""
        if self.spec.memory_fraction is None:
            return None
        c = self.config
        per_position = 2 * len(self.slice.layers) * c.n_kv_head * c.head_dim * self.dtype.itemsize  # K and V
        weights = sum(p.nbytes for p in self.slice.parameters())
        scratch = per_position * self.spec.kv_block_size  # the pool's padding block (stage_workers/kv_cache.py)
        free, total = device_memory(self.device)
        return kv_tokens_for_memory(self.spec.memory_fraction, free, total, weights + scratch, per_position,
                                    self.spec.kv_block_size, self.stage)

    def _check(self, batch: ExtendBatch) -> None:
        """The worker contract, checked on every call (errors, not asserts: they hold under python -O)."""
        where = f"stage {self.stage} worker"
        require(batch.segments, f"{where}: extend called with no segments")
        require((batch.trunk is None) == (self.stage == 0), f"{where}: trunk state must come from upstream iff stage > 0")
        require((batch.prev_token_ids is None) != (self.stage == 0), f"{where}: prev_token_ids go to stage 0 only")
        require(len({s.seq_id for s in batch.segments}) == len(batch.segments), f"{where}: a sequence appears twice")
        for seg in batch.segments:
            cached = self.cache.length(seg.seq_id)
            require(seg.start == cached, f"{where}: sequence {seg.seq_id} extends at {seg.start} but has {cached} cached")
            require(seg.length >= 1 and 0 <= seg.num_logits <= seg.length, f"{where}: bad segment {seg}")
            require(seg.start + seg.length <= self.config.sequence_len,
                    f"{where}: sequence {seg.seq_id} would exceed the context of {self.config.sequence_len} positions")
        needed = sum(self.cache.blocks_needed(s.seq_id, s.start + s.length) for s in batch.segments)
        if needed > self.cache.num_free_blocks:
            raise KVCacheFull(
                f"{where}: KV cache full: the batch needs {needed} blocks, {self.cache.num_free_blocks} "
                f"of {self.cache.num_blocks} are free"
            )
