"""The trainable PoE model: the serving trunk's own layers over whole sequences, plus the loss.

It reuses `stage_workers.trunk` (embedding, layers, readout, stage logits), so what is trained
is exactly what is served. The residual Log-OP objective, per stage k with stage log-probs
log p_j and Log-OP weights 1:

    L_res(k)   = CE( normalize( logop( sg(log p_0), ..., sg(log p_{k-1}), log p_k ) ) )
    L_local(k) = CE( log p_k )
    L          = (1/K) * sum_k ( L_res(k) + lam * L_local(k) * [k > 0] )

`sg` stops the gradient: earlier experts' contributions are held fixed for stage k's loss, so
stage k learns residual evidence relative to their product, and the prefix 0..k is a usable
next-token predictor at every k (stage 0's residual term is its own local loss). `lam`
(`local_weight`, default 0) optionally also pulls each later stage towards being a predictor on
its own; it trades against the full product, because experts that all learn the same
distribution have nothing to add to each other (a run with lam = 1 ended with the full PoE
slightly worse than its last stage). Trunk layers receive gradients from every stage whose
boundary lies at or above them. This module knows nothing about data or checkpoints on disk.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from stage_workers.attention import sequence_attention
from stage_workers.config import ModelConfig
from stage_workers.logop import combine, normalize
from stage_workers.trunk import Embedding, TrunkLayer, readout, rotary_tables, stage_logits


class TrainablePoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        K, V, C = config.num_stages, config.vocab_size, config.n_embd
        self.embedding = Embedding(config)
        self.layers = nn.ModuleList(TrunkLayer(config, i) for i in range(config.n_layer))
        self.lm_head = nn.Parameter(torch.empty(V, C))
        self.stage_heads = nn.Parameter(torch.empty(K, V, C))
        self.backout_lambda = nn.Parameter(torch.empty(1))
        cos, sin = rotary_tables(config, torch.float32)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """nanochat's init, with small non-zero output projections so every stage starts learning."""
        C, L = self.config.n_embd, self.config.n_layer
        s = math.sqrt(3.0 / C)
        u = lambda t, lo, hi: t.copy_(torch.rand(t.shape, generator=generator) * (hi - lo) + lo)  # noqa: E731
        self.embedding.wte.copy_(torch.randn(self.embedding.wte.shape, generator=generator) * 0.8)
        u(self.embedding.smear_gate, 0.0, 0.02)
        self.embedding.smear_lambda.fill_(0.0)
        self.backout_lambda.fill_(0.2)
        self.lm_head.copy_(torch.randn(self.lm_head.shape, generator=generator) * 0.001)
        self.stage_heads.copy_(torch.randn(self.stage_heads.shape, generator=generator) * 0.001)
        for i, layer in enumerate(self.layers):
            u(layer.w_qkv, -s, s)
            u(layer.w_fc, -0.4 * s, 0.4 * s)
            layer.w_out.copy_(torch.randn(layer.w_out.shape, generator=generator) * 0.02 / math.sqrt(C))
            layer.w_proj.copy_(torch.randn(layer.w_proj.shape, generator=generator) * 0.02 / math.sqrt(4 * C))
            layer.resid_lambda.fill_(1.15 - 0.10 * i / max(L - 1, 1))
            layer.x0_lambda.fill_(0.20 - 0.15 * i / max(L - 1, 1))
            if layer.value_embed is not None:
                u(layer.value_embed, -s, s)
                u(layer.ve_gate, 0.0, 0.02)

    def stage_logits(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """idx: (B, T) -> one (B, T, V) fp32 logits tensor per stage."""
        config = self.config
        T = idx.shape[1]
        prev = torch.cat([torch.full_like(idx[:, :1], -1), idx[:, :-1]], dim=1)  # (B, T)
        x = x0 = self.embedding(idx, prev)  # (B, T, C)
        cos, sin = self.cos[:T], self.sin[:T]  # (T, D/2), broadcast over the batch
        x_backout, outputs = None, []
        boundaries = config.stage_boundaries
        for i, layer in enumerate(self.layers):
            window = config.layer_windows[i]
            x = layer(x, x0, idx, cos, sin, lambda q, k, v, w=window: sequence_attention(q, k, v, w))
            if i == config.backout_layer:
                x_backout = x
            if i in boundaries:
                k = boundaries.index(i)
                lam = self.backout_lambda if i >= config.backout_layer else None
                z = readout(x, x_backout, lam)
                outputs.append(stage_logits(z, self.lm_head + self.stage_heads[k], config.logit_softcap))
        return outputs

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, local_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual Log-OP loss (see the module docstring). Returns (loss, (K,) detached local CE)."""
        lps = [torch.log_softmax(z, dim=-1) for z in self.stage_logits(idx)]  # K x (B, T, V)
        K, alpha = len(lps), self.config.poe_alpha
        nll = lambda lp: F.nll_loss(lp.flatten(0, 1), targets.flatten())  # noqa: E731
        total, local = 0.0, []
        for k in range(K):
            parts = [lp.detach() for lp in lps[:k]] + [lps[k]]
            residual = nll(normalize(combine(parts, [1.0] * (k + 1), alpha)))
            own = nll(lps[k])
            total = total + residual + (local_weight * own if k > 0 else 0.0)
            local.append(own.detach())
        return total / K, torch.stack(local)

    def checkpoint_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor under the spec's checkpoint names."""
        config = self.config
        yield "transformer.wte.weight", self.embedding.wte
        yield "smear_gate.weight", self.embedding.smear_gate
        yield "smear_lambda", self.embedding.smear_lambda
        yield "backout_lambda", self.backout_lambda
        yield "lm_head.weight", self.lm_head
        for k in range(config.num_stages):
            yield f"lm_head_stages.{k}.weight", self.stage_heads[k]
        yield "resid_lambdas", torch.stack([layer.resid_lambda for layer in self.layers])
        yield "x0_lambdas", torch.stack([layer.x0_lambda for layer in self.layers])
        for i, layer in enumerate(self.layers):
            q, k, v = layer.w_qkv.split(layer.split)
            p = f"transformer.h.{i}."
            yield p + "attn.c_q.weight", q
            yield p + "attn.c_k.weight", k
            yield p + "attn.c_v.weight", v
            yield p + "attn.c_proj.weight", layer.w_out
            yield p + "mlp.c_fc.weight", layer.w_fc
            yield p + "mlp.c_proj.weight", layer.w_proj
            if layer.value_embed is not None:
                yield p + "attn.ve_gate.weight", layer.ve_gate
                yield f"value_embeds.{i}.weight", layer.value_embed
