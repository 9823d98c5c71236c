"""Causal sliding-window GQA attention, over a paged KV cache or over a whole sequence.

`CacheAttention` is built once per worker call from its segments and `StepInputs`: it says
where each new key is written and, per distinct window, which cached keys each padded query
may see. Every layer of the call then reuses it. The query heads of one KV head are folded
into the query axis, so GQA needs no copy of K/V and works on any torch with SDPA. This module knows nothing
about weights, stages or requests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_cache import PagedKVCache
from .messages import Segment, require
from .step_inputs import StepInputs


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Key j is visible to query i iff j <= i and i - j <= window. Shapes broadcast."""
    return (k_pos <= q_pos) & (q_pos - k_pos <= window)


class CacheAttention:
    def __init__(self, cache: PagedKVCache, segments: list[Segment], inputs: StepInputs, windows: set[int], n_head: int,
                 key_span: int | None = None):
        """`inputs` are on the cache's device; sizes come from the host-side `segments`, so building
        the plan needs nothing back from the device. `key_span`: a fixed number of keys per query
        (a CUDA graph's shape), at least the longest span any query sees; default: that span."""
        device = cache.k.device
        self.cache = cache
        self.B = len(segments)
        self.n_max = n_max = max(s.length for s in segments)
        self.n_rep = n_head // cache.k.shape[2]  # query heads per KV head
        self.pad_index, self.write_slots = inputs.pad_index, inputs.write_slots  # (N,), (N,)
        starts, lengths, q_pos = inputs.starts, inputs.lengths, inputs.q_pos  # (B,), (B,), (B, n_max)
        q_valid = torch.arange(n_max, device=device) < lengths[:, None]  # (B, n_max)

        self.plans: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for window in windows:
            k_lo = (starts - window).clamp(min=0)  # (B,) first key any query of the segment sees
            k_len = starts + lengths - k_lo  # (B,)
            k_max = max(s.start + s.length - max(s.start - window, 0) for s in segments)  # widest key span
            if key_span is not None:
                require(key_span >= k_max or key_span >= window + 1, f"key span {key_span} < {k_max}")
                k_max = min(key_span, window + 1)
            j = torch.arange(k_max, device=device)
            k_valid = j < k_len[:, None]  # (B, K)
            k_pos = k_lo[:, None] + torch.where(k_valid, j, 0)  # (B, K)
            mask = k_valid[:, None, :] & window_mask(q_pos[:, :, None], k_pos[:, None, :], window)
            mask |= ~q_valid[:, :, None] & (j == 0)  # a padded query sees one key: no NaN rows
            mask = mask.repeat(1, self.n_rep, 1).unsqueeze(1)  # (B, 1, G*n_max, K)
            self.plans[window] = (cache.slots(inputs.tables, k_pos), mask)  # gather (B, K), mask

    def attend(self, layer: int, window: int, q, k, v) -> torch.Tensor:
        """q: (N, H, D); k, v: (N, Hkv, D) for the new positions. Returns (N, H*D)."""
        N, H, D = q.shape
        Hkv, G, B, n_max = k.shape[1], self.n_rep, self.B, self.n_max
        self.cache.k[layer][self.write_slots] = k
        self.cache.v[layer][self.write_slots] = v
        gather, mask = self.plans[window]
        keys = self.cache.k[layer][gather].transpose(1, 2)  # (B, Hkv, K, D)
        values = self.cache.v[layer][gather].transpose(1, 2)  # (B, Hkv, K, D)
        if B == 1:
            padded = q.unsqueeze(0)  # (1, n_max, H, D)
        else:
            padded = q.new_zeros(B * n_max, H, D).index_copy_(0, self.pad_index, q).view(B, n_max, H, D)
        queries = padded.view(B, n_max, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * n_max, D)
        y = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)  # (B, Hkv, G*n_max, D)
        y = y.view(B, Hkv, G, n_max, D).permute(0, 3, 1, 2, 4).reshape(B * n_max, H * D)
        return y if B == 1 else y[self.pad_index]


def sequence_attention(q, k, v, window: int) -> torch.Tensor:
    """Whole sequences, no cache (training). q: (B, T, H, D); k, v: (B, T, Hkv, D) -> (B, T, H*D)."""
    B, T, H, D = q.shape
    pos = torch.arange(T, device=q.device)
    mask = window_mask(pos[:, None], pos[None, :], window)  # (T, T)
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    v = v.repeat_interleave(H // v.shape[2], dim=2)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return y.transpose(1, 2).reshape(B, T, H * D)
