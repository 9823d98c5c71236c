"""The trunk's math (spec section 3): embedding with smear, one transformer layer, a stage readout.

Every function here works on any leading shape (`(N, C)` packed positions at inference,
`(B, T, C)` in training). Attention is passed in as a callable, so the same layer runs against
a paged KV cache (inference) or over a whole sequence (training). This module knows nothing
about caches, sequences, stages or checkpoints.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import SMEAR_CHANNELS, VE_GATE_CHANNELS, ModelConfig

QK_SCALE = 1.2  # nanochat's "sharper attention" factor applied to normed q and k
VE_GATE_SCALE = 3.0  # value-embedding gate range (0, 3)

# attend(q (..., H, D), k (..., Hkv, D), v (..., Hkv, D)) -> y (..., H*D)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))  # eps defaults to the dtype's machine epsilon


def rotary_tables(config: ModelConfig, dtype: torch.dtype, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (sequence_len, D/2), computed in fp32 then cast like nanochat does."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
    freqs = torch.outer(torch.arange(config.sequence_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Halves convention. x: (..., H, D); cos, sin: (..., D/2) for the same leading positions."""
    d = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Embedding(nn.Module):
    """Token embedding, normed, with nanochat's smear of the previous token's embedding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.wte = nn.Parameter(torch.empty(config.vocab_size, config.n_embd))
        self.smear_gate = nn.Parameter(torch.empty(1, SMEAR_CHANNELS))
        self.smear_lambda = nn.Parameter(torch.empty(1))

    def forward(self, token_ids: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor:
        """token_ids, prev_ids: same shape; prev_ids < 0 where there is no previous token."""
        e = rms_norm(self.wte[token_ids])  # (..., C)
        e_prev = rms_norm(self.wte[prev_ids.clamp(min=0)])  # (..., C)
        gate = self.smear_lambda * torch.sigmoid(e[..., :SMEAR_CHANNELS] @ self.smear_gate.t())  # (..., 1)
        has_prev = (prev_ids >= 0).unsqueeze(-1)
        return torch.where(has_prev, e + gate * e_prev, e)


class TrunkLayer(nn.Module):
    """One block: residual/x0 mix, attention (with value embeddings on alternate layers), MLP."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        C, H, Hkv, D = config.n_embd, config.n_head, config.n_kv_head, config.head_dim
        self.layer_idx = layer_idx
        self.split = (H * D, Hkv * D, Hkv * D)
        self.heads = (H, Hkv, D)
        self.w_qkv = nn.Parameter(torch.empty(sum(self.split), C))  # c_q, c_k, c_v stacked
        self.w_out = nn.Parameter(torch.empty(C, C))  # attn.c_proj
        self.w_fc = nn.Parameter(torch.empty(4 * C, C))  # mlp.c_fc
        self.w_proj = nn.Parameter(torch.empty(C, 4 * C))  # mlp.c_proj
        self.resid_lambda = nn.Parameter(torch.empty(()))
        self.x0_lambda = nn.Parameter(torch.empty(()))
        if config.has_value_embed(layer_idx):
            self.ve_gate = nn.Parameter(torch.empty(Hkv, VE_GATE_CHANNELS))
            self.value_embed = nn.Parameter(torch.empty(config.vocab_size, Hkv * D))
        else:
            self.ve_gate = self.value_embed = None

    def forward(self, x, x0, token_ids, cos, sin, attend: Attend) -> torch.Tensor:
        """x, x0: (..., C); token_ids: (...); cos, sin: (..., D/2). Returns (..., C)."""
        H, Hkv, D = self.heads
        x = self.resid_lambda * x + self.x0_lambda * x0
        h = rms_norm(x)
        q, k, v = (h @ self.w_qkv.t()).split(self.split, dim=-1)
        q = q.unflatten(-1, (H, D))  # (..., H, D)
        k, v = k.unflatten(-1, (Hkv, D)), v.unflatten(-1, (Hkv, D))  # (..., Hkv, D)
        if self.value_embed is not None:
            gate = VE_GATE_SCALE * torch.sigmoid(h[..., :VE_GATE_CHANNELS] @ self.ve_gate.t())  # (..., Hkv)
            v = v + gate.unsqueeze(-1) * self.value_embed[token_ids].unflatten(-1, (Hkv, D))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = QK_SCALE * rms_norm(q), QK_SCALE * rms_norm(k)
        x = x + attend(q, k, v) @ self.w_out.t()
        h = rms_norm(x)
        return x + F.relu(h @ self.w_fc.t()).square() @ self.w_proj.t()


def readout(x: torch.Tensor, x_backout: torch.Tensor | None, backout_lambda: torch.Tensor | None) -> torch.Tensor:
    """The normed hidden state a stage head reads: backout applies past the middle layer."""
    if backout_lambda is not None:
        x = x - backout_lambda * x_backout
    return rms_norm(x)


def stage_logits(z: torch.Tensor, head_weight: torch.Tensor, softcap: float) -> torch.Tensor:
    """z: (..., C); head_weight: (V, C) = lm_head + lm_head_stages[k]. Returns fp32 (..., V)."""
    logits = (z @ head_weight.t()).float()
    return softcap * torch.tanh(logits / softcap)
