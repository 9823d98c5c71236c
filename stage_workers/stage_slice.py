"""One stage's slice of the trunk: its contiguous layers, ending at its boundary, and its head.

Stage 0 also owns the embedding. The head weight is stored pre-summed
(`lm_head + lm_head_stages[k]`), one matmul instead of two. `load_stage_slice` reads exactly
the slice's tensors from a checkpoint. The slice runs packed positions through its layers
given their `StepInputs` and a `CacheAttention`; it knows nothing about sequences beyond that.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .attention import CacheAttention
from .checkpoint import CheckpointReader
from .config import ModelConfig
from .messages import ExtendResult, TrunkState
from .step_inputs import StepInputs
from .trunk import Embedding, TrunkLayer, readout, stage_logits


class StageSlice(nn.Module):
    def __init__(self, config: ModelConfig, stage: int):
        super().__init__()
        self.config = config
        self.stage = stage
        self.layer_ids = config.stage_layers(stage)
        self.embedding = Embedding(config) if stage == 0 else None
        self.layers = nn.ModuleList(TrunkLayer(config, i) for i in self.layer_ids)
        self.head_weight = nn.Parameter(torch.empty(config.vocab_size, config.n_embd))
        past_middle = config.stage_boundaries[stage] >= config.backout_layer
        self.backout_lambda = nn.Parameter(torch.empty(1)) if past_middle else None
        self.is_last = stage == config.num_stages - 1

    @property
    def windows(self) -> set[int]:
        return {self.config.layer_windows[i] for i in self.layer_ids}

    def forward(self, inputs: StepInputs, trunk: TrunkState | None, attention: CacheAttention, cos, sin) -> ExtendResult:
        """inputs on this slice's device; trunk: upstream boundary state (None on stage 0);
        cos, sin: (N, D/2) rotary rows of the packed positions."""
        tokens = inputs.token_ids  # (N,)
        if self.embedding is not None:
            x = x0 = self.embedding(tokens, inputs.prev_ids)  # (N, C)
            x_backout = None
        else:
            x, x0, x_backout = trunk.x, trunk.x0, trunk.x_backout
        for local, layer in enumerate(self.layers):
            window = self.config.layer_windows[layer.layer_idx]
            x = layer(x, x0, tokens, cos, sin, partial(attention.attend, local, window))
            if layer.layer_idx == self.config.backout_layer:
                x_backout = x
        logits = None
        rows = inputs.logit_rows  # (M,)
        if rows.numel():
            z = readout(x[rows], None if x_backout is None else x_backout[rows], self.backout_lambda)
            logits = stage_logits(z, self.head_weight, self.config.logit_softcap)  # (M, V)
        trunk = None if self.is_last else TrunkState(x, x0, x_backout)
        return ExtendResult(trunk=trunk, logits=logits)


def _checkpoint_state(reader: CheckpointReader, stage: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The slice's parameters under its module names, read tensor by tensor from the checkpoint."""
    config = reader.config
    read = lambda name: reader.read(name).to(dtype)  # noqa: E731
    state = {}
    if stage == 0:
        state["embedding.wte"] = read("transformer.wte.weight")
        state["embedding.smear_gate"] = read("smear_gate.weight")
        state["embedding.smear_lambda"] = read("smear_lambda")
    resid, x0 = reader.read("resid_lambdas").float(), reader.read("x0_lambdas").float()
    for local, i in enumerate(config.stage_layers(stage)):
        p, q = f"layers.{local}.", f"transformer.h.{i}."
        state[p + "w_qkv"] = torch.cat([read(q + f"attn.c_{n}.weight") for n in "qkv"])
        state[p + "w_out"] = read(q + "attn.c_proj.weight")
        state[p + "w_fc"] = read(q + "mlp.c_fc.weight")
        state[p + "w_proj"] = read(q + "mlp.c_proj.weight")
        state[p + "resid_lambda"] = resid[i].clone()  # scalars stay fp32, as in nanochat
        state[p + "x0_lambda"] = x0[i].clone()
        if config.has_value_embed(i):
            state[p + "ve_gate"] = read(q + "attn.ve_gate.weight")
            state[p + "value_embed"] = read(f"value_embeds.{i}.weight")
    head = reader.read("lm_head.weight").float() + reader.read(f"lm_head_stages.{stage}.weight").float()
    state["head_weight"] = head.to(dtype)
    if config.stage_boundaries[stage] >= config.backout_layer:
        state["backout_lambda"] = read("backout_lambda")
    return state


def load_stage_slice(reader: CheckpointReader, stage: int, dtype: torch.dtype, device) -> StageSlice:
    with torch.device("meta"):
        module = StageSlice(reader.config, stage)
    state = {k: v.to(device) for k, v in _checkpoint_state(reader, stage, dtype).items()}
    module.load_state_dict(state, assign=True, strict=True)
    return module.requires_grad_(False).eval()

