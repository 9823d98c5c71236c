"""The test oracle: a plain, slow reference implementation of POE_SPEC.md §3 (the trunk) and §4
(Log-OP, greedy, sampling, WAND, speculation, WAND calibration).

Every token is computed by running the whole sequence from scratch: no KV cache, no batching,
explicit (T, T) window masks and an explicit softmax for attention. It reads the checkpoint
itself (config.json, safetensors, one common name prefix, padded vocab rows) and shares no code
with `stage_workers/` or `coordinator/`, so the fast path can be tested against it.

It does not know about tokenizers, batches, devices, serving, sequence-length limits or input
validation beyond asserts: one sequence of plain int token ids at a time, on the CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

HF_ALIASES = {  # Hugging Face name -> canonical name
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "num_key_value_heads": "n_kv_head",
    "max_position_embeddings": "sequence_len",
}
REQUIRED_KEYS = ("vocab_size", "n_layer", "n_embd", "n_head", "sequence_len", "poe_stage_layout")
DEFAULTS = dict(window_pattern="SSSL", poe_alpha=0.0, logit_softcap=15.0, rope_base=100000.0)
VE_GATE_CHANNELS = 12  # value-embedding gates read h[..., :12]
SMEAR_CHANNELS = 24  # the smear gate reads e[t][:24]


# ----------------------------------------------------------------------------------------------
# checkpoint reading


def read_config(checkpoint_dir: Path) -> dict:
    """config.json with HF aliases mapped to canonical keys and defaults filled in."""
    raw = json.loads((checkpoint_dir / "config.json").read_text())
    cfg = dict(raw)
    for alias, key in HF_ALIASES.items():
        if alias in raw and key not in raw:
            cfg[key] = raw[alias]
    for key in REQUIRED_KEYS:
        assert key in cfg, f"config.json is missing required key {key!r}"
    cfg.setdefault("n_kv_head", cfg["n_head"])
    for key, value in DEFAULTS.items():
        cfg.setdefault(key, value)
    bounds_file = checkpoint_dir / "wand_bounds.json"
    if bounds_file.exists():
        cfg["wand_p99_bounds"] = json.loads(bounds_file.read_text())["wand_p99_bounds"]
    return cfg


def read_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors, from model.safetensors or every shard in model.safetensors.index.json."""
    single = checkpoint_dir / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = json.loads((checkpoint_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(checkpoint_dir / shard)))
    return tensors


def strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the one common prefix, found from where `lm_head.weight` sits (e.g. `model.`)."""
    heads = [name for name in tensors if name.endswith("lm_head.weight")]
    assert len(heads) == 1, f"expected exactly one lm_head.weight, found {heads}"
    prefix = heads[0][: -len("lm_head.weight")]
    assert all(name.startswith(prefix) for name in tensors), f"not every tensor is under prefix {prefix!r}"
    return {name[len(prefix):]: t for name, t in tensors.items()}


def is_vocab_rows(name: str) -> bool:
    return name in ("transformer.wte.weight", "lm_head.weight") or name.startswith(("lm_head_stages.", "value_embeds."))


def crop_vocab(tensors: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Checkpoints may pad the vocab dimension; only the first vocab_size rows are real."""
    return {n: (t[:vocab_size] if is_vocab_rows(n) and t.size(0) > vocab_size else t) for n, t in tensors.items()}


def short_window(cfg: dict) -> int:
    if cfg.get("short_window") is not None:
        return int(cfg["short_window"])
    return math.ceil(cfg["sequence_len"] / 4 / 128) * 128


def layer_windows(cfg: dict) -> list[int]:
    """w_i per layer: window_pattern tiled over layers, the last layer always sequence_len."""
    sizes = {"S": short_window(cfg), "L": cfg["sequence_len"]}
    pattern = cfg["window_pattern"].upper()
    windows = [sizes[pattern[i % len(pattern)]] for i in range(cfg["n_layer"])]
    windows[-1] = cfg["sequence_len"]
    return windows


def stage_boundaries(cfg: dict) -> list[int]:
    """Last layer of each stage: cumulative poe_stage_layout minus one."""
    ends, total = [], 0
    for n in cfg["poe_stage_layout"]:
        total += n
        ends.append(total - 1)
    assert total == cfg["n_layer"], f"poe_stage_layout {cfg['poe_stage_layout']} does not sum to n_layer"
    return ends


# ----------------------------------------------------------------------------------------------
# trunk math (spec §3), one sequence, shapes without a batch dimension


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def window_mask(T: int, window: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask: key j visible to query i iff j <= i and i - j <= window."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    visible = (j <= i) & (i - j <= window)  # (T, T)
    return torch.zeros(T, T, dtype=dtype).masked_fill(~visible, float("-inf"))


def rotary_tables(T: int, D: int, base: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))  # (D/2,)
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)  # (T, D/2)
    return freqs.cos().to(dtype)[:, None, :], freqs.sin().to(dtype)[:, None, :]  # (T, 1, D/2) each


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]  # (T, H, D/2) each
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)  # (T, H, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Explicit softmax attention; query head h reads kv head h // (H / H_kv)."""
    H, H_kv, D = q.size(1), k.size(1), q.size(2)
    k = k.repeat_interleave(H // H_kv, dim=1)  # (T, H, D)
    v = v.repeat_interleave(H // H_kv, dim=1)  # (T, H, D)
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(D) + mask  # (H, T, T)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # softmax in fp32 for a trustworthy reference
    return torch.einsum("hij,jhd->ihd", probs, v)  # (T, H, D)


def smear(e: torch.Tensor, gate_w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """x[0] = e[0]; x[t] = e[t] + lambda * sigmoid(gate . e[t][:24]) * e[t-1]."""
    gate = torch.sigmoid(e[1:, :SMEAR_CHANNELS] @ gate_w.T)  # (T-1, 1)
    return torch.cat([e[:1], e[1:] + lam * gate * e[:-1]], dim=0)  # (T, C)


# ----------------------------------------------------------------------------------------------
# Log-OP and sampling helpers (spec §4)


def top2_margin(score_V: torch.Tensor) -> float:
    """Top-1 minus top-2 of a (V,) score; tests use it to set near-ties aside."""
    top = torch.topk(score_V.float(), 2).values
    return (top[0] - top[1]).item()


def filtered_logits(lp: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                    min_p: float | None = None) -> torch.Tensor:
    """Temperature, then min-p, then top-k, then top-p, on (V,) normalized log-probs; dropped
    tokens -> -inf."""
    logits = lp / temperature  # (V,)
    V = logits.size(0)
    if min_p:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_k is not None and top_k < V:
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p is not None and top_p < 1:
        probs = torch.softmax(logits, dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        drop_sorted = (cum - sorted_probs) >= top_p  # the top token always survives
        drop = torch.zeros(V, dtype=torch.bool)
        drop[order[drop_sorted]] = True
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def controlled(lp: torch.Tensor, seq: list[int], prompt_len: int, repetition_penalty=1.0, presence_penalty=0.0,
               frequency_penalty=0.0, logit_bias=None, min_tokens=0, stop_token_ids=()) -> torch.Tensor:
    """Decoding controls on (V,) normalized log-probs of the token after `seq`, whose first
    prompt_len tokens are the prompt: HF's repetition penalty (a score < 0 times the penalty) over
    every token seen, OpenAI's presence and frequency penalties over the output, the bias (clamped
    to +-100), and the stop ids impossible while fewer than min_tokens are generated."""
    out = lp.clone()
    for t in set(seq):
        out[t] = out[t] * repetition_penalty if out[t] < 0 else out[t] / repetition_penalty
    output = seq[prompt_len:]
    for t in set(output):
        out[t] -= presence_penalty + frequency_penalty * output.count(t)
    for t, b in (logit_bias or {}).items():
        out[int(t)] += max(-100.0, min(100.0, b))
    if len(output) < min_tokens:
        for t in stop_token_ids:
            out[t] = float("-inf")
    return out


def uniform(g: torch.Generator) -> float:
    return float(torch.rand(1, generator=g, dtype=torch.float64))


def draw_at(weights: torch.Tensor, u: float) -> int:
    """Inverse CDF at u over token ids in ascending order; (V,) weights need not sum to 1."""
    cdf = torch.cumsum(weights.double(), dim=-1)
    idx = torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64) * cdf[-1], right=True)
    return min(int(idx.item()), weights.size(0) - 1)


def draw(logits: torch.Tensor, g: torch.Generator) -> int:
    """Inverse-CDF draw over token ids in ascending order, one uniform per token."""
    return draw_at(torch.softmax(logits, dim=-1), uniform(g))


# ----------------------------------------------------------------------------------------------
# the oracle


class Oracle:
    """Every stage's logits at every position, recomputed from scratch, and the modes on top."""

    def __init__(self, checkpoint_dir, dtype: torch.dtype = torch.float32):
        checkpoint_dir = Path(checkpoint_dir)
        self.cfg = cfg = read_config(checkpoint_dir)
        self.dtype = dtype
        self.vocab_size: int = cfg["vocab_size"]
        self.sequence_len: int = cfg["sequence_len"]
        self.poe_alpha: float = float(cfg["poe_alpha"])
        self.softcap: float = float(cfg["logit_softcap"])
        self.wand_p99_bounds: list | None = cfg.get("wand_p99_bounds")
        self.n_layer, self.n_head, self.n_kv_head = cfg["n_layer"], cfg["n_head"], cfg["n_kv_head"]
        self.head_dim = cfg["n_embd"] // cfg["n_head"]
        self.windows = layer_windows(cfg)
        self.boundaries = stage_boundaries(cfg)
        self.num_stages: int = len(self.boundaries)
        tensors = crop_vocab(strip_prefix(read_tensors(checkpoint_dir)), self.vocab_size)
        # fresh copies: safetensors hands back views at file-dependent alignments, and CPU matmul
        # kernels can round differently on them, which would make equal weights give unequal logits
        keep_fp32 = ("resid_lambdas", "x0_lambdas")
        self.w = {n: t.to(torch.float32 if n in keep_fp32 else dtype, copy=True) for n, t in tensors.items()}

    def has_value_embeds(self, i: int) -> bool:
        return i % 2 == (self.n_layer - 1) % 2

    # ---- trunk ----

    def attn(self, i: int, h: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor, rope) -> torch.Tensor:
        p = f"transformer.h.{i}.attn."
        T, H, H_kv, D = h.size(0), self.n_head, self.n_kv_head, self.head_dim
        q = (h @ self.w[p + "c_q.weight"].T).view(T, H, D)
        k = (h @ self.w[p + "c_k.weight"].T).view(T, H_kv, D)
        v = (h @ self.w[p + "c_v.weight"].T).view(T, H_kv, D)
        if self.has_value_embeds(i):
            gate = 3 * torch.sigmoid(h[..., :VE_GATE_CHANNELS] @ self.w[p + "ve_gate.weight"].T)  # (T, H_kv)
            ve = self.w[f"value_embeds.{i}.weight"][idx].view(T, H_kv, D)
            v = v + gate[..., None] * ve
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q, k = 1.2 * norm(q), 1.2 * norm(k)
        y = attention(q, k, v, mask).reshape(T, H * D)  # (T, C)
        return y @ self.w[p + "c_proj.weight"].T

    def mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        p = f"transformer.h.{i}.mlp."
        return F.relu(h @ self.w[p + "c_fc.weight"].T).square() @ self.w[p + "c_proj.weight"].T

    def residual_after_each_layer(self, ids: list[int]) -> list[torch.Tensor]:
        """[x after layer 0, ..., x after layer n_layer-1], each (T, C)."""
        assert len(ids) > 0, "the oracle needs at least one token"
        idx = torch.tensor(ids, dtype=torch.long)  # (T,)
        T = idx.size(0)
        e = norm(self.w["transformer.wte.weight"][idx])  # (T, C)
        x = x0 = smear(e, self.w["smear_gate.weight"], self.w["smear_lambda"])
        rope = rotary_tables(T, self.head_dim, float(self.cfg["rope_base"]), self.dtype)
        masks = {w: window_mask(T, w, self.dtype) for w in set(self.windows)}
        after = []
        for i in range(self.n_layer):
            x = self.w["resid_lambdas"][i] * x + self.w["x0_lambdas"][i] * x0
            x = x + self.attn(i, norm(x), idx, masks[self.windows[i]], rope)
            x = x + self.mlp(i, norm(x))
            after.append(x)
        return after

    def stage_logits(self, ids: list[int]) -> torch.Tensor:
        """(K, T, V) fp32 soft-capped logits of every stage at every position."""
        after = self.residual_after_each_layer(ids)
        backout_layer = self.n_layer // 2
        x_b = after[backout_layer]
        c = self.softcap
        out = []
        for k, b in enumerate(self.boundaries):
            h = after[b] - self.w["backout_lambda"] * x_b if b >= backout_layer else after[b]
            z = norm(h).float()  # (T, C)
            raw = z @ self.w["lm_head.weight"].float().T + z @ self.w[f"lm_head_stages.{k}.weight"].float().T
            out.append(c * torch.tanh(raw / c))  # (T, V)
        return torch.stack(out)  # (K, T, V)

    def stage_logprobs(self, ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(self.stage_logits(ids), dim=-1)  # (K, T, V)

    # ---- Log-OP ----

    def score(self, logprobs_KV: torch.Tensor, stages, weights=None) -> torch.Tensor:
        """sum_k w_k * logp_k / (sum w)^(1 - alpha) over the selected stages; (K, ..., V) -> (..., V)."""
        stages = list(stages)
        weights = [1.0] * len(stages) if weights is None else [float(w) for w in weights]
        assert len(stages) == len(set(stages)) > 0, f"stages must be unique and non-empty, got {stages}"
        assert all(0 <= s < logprobs_KV.size(0) for s in stages), f"stage out of range in {stages}"
        assert len(weights) == len(stages), "one weight per stage"
        assert all(math.isfinite(w) and w > 0 for w in weights), f"weights must be finite and > 0, got {weights}"
        total = sum(w * logprobs_KV[s].float() for s, w in zip(stages, weights))
        return total / sum(weights) ** (1.0 - self.poe_alpha)

    @staticmethod
    def normalized(score: torch.Tensor) -> torch.Tensor:
        return score - torch.logsumexp(score, dim=-1, keepdim=True)

    def all_stages(self) -> list[int]:
        return list(range(self.num_stages))

    def forward(self, ids: list[int]) -> torch.Tensor:
        """(T, V) full-PoE normalized log-probs."""
        return self.normalized(self.score(self.stage_logprobs(ids), self.all_stages()))

    def next_score(self, ids: list[int], stages=None, weights=None) -> torch.Tensor:
        stages = self.all_stages() if stages is None else stages
        return self.score(self.stage_logprobs(ids)[:, -1], stages, weights)  # (V,)

    def next_distribution(self, ids: list[int], stages=None, weights=None) -> torch.Tensor:
        return self.normalized(self.next_score(ids, stages, weights))  # (V,)

    # ---- modes ----

    def greedy_token(self, ids: list[int], stages=None, weights=None, controls=None, prompt_len=0) -> int:
        """argmax of the score; with `controls` (oracle.controlled's arguments), of the controlled
        normalized log-probs."""
        score = self.next_score(ids, stages, weights)
        if controls:
            score = controlled(self.normalized(score), ids, prompt_len, **controls)
        return int(torch.argmax(score).item())

    def greedy(self, ids, max_new_tokens, stages=None, weights=None, eos_token_id=None, controls=None) -> list[int]:
        seq, out = list(ids), []
        while len(out) < max_new_tokens:
            token = self.greedy_token(seq, stages, weights, controls, len(ids))
            seq.append(token)
            out.append(token)
            if token == eos_token_id:
                break
        return out

    def greedy_margins(self, ids, tokens, stages=None, weights=None) -> list[float]:
        """top2_margin of the score before each of `tokens`; min() of it sets near-ties aside."""
        seq, margins = list(ids), []
        for token in tokens:
            margins.append(top2_margin(self.next_score(seq, stages, weights)))
            seq.append(token)
        return margins

    def sample(self, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=0,
               stages=None, weights=None, eos_token_id=None, controls=None, min_p=None) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        seq, out = list(ids), []
        while len(out) < max_new_tokens:
            lp = self.next_distribution(seq, stages, weights)  # (V,)
            if controls:
                lp = controlled(lp, seq, len(ids), **controls)
            token = draw(filtered_logits(lp, temperature, top_k, top_p, min_p), g)
            seq.append(token)
            out.append(token)
            if token == eos_token_id:
                break
        return out

    def wand_bounds(self, p99_bounds) -> list[float]:
        bounds = p99_bounds if p99_bounds is not None else self.wand_p99_bounds
        if bounds is None:
            return [math.inf] * self.num_stages
        assert len(bounds) == self.num_stages, f"need one WAND bound per stage, got {len(bounds)}"
        return [float(b) for b in bounds]

    def wand_token(self, lp_KV: torch.Tensor, safety: float, bounds: list[float], seq=(), prompt_len=0,
                   controls=None) -> tuple[int, int]:
        """(token, stage j that emitted it) from every stage's (K, V) log-probs at one position;
        with `controls`, the margin and argmax are of each prefix's controlled distribution."""
        for j in range(self.num_stages):
            score_j = self.score(lp_KV, range(j + 1))  # (V,)
            if controls:
                score_j = controlled(self.normalized(score_j), list(seq), prompt_len, **controls)
            if j == self.num_stages - 1 or top2_margin(score_j) > safety * bounds[j]:
                return int(torch.argmax(score_j).item()), j
        raise AssertionError("unreachable: the last stage always emits")

    def wand(self, ids, max_new_tokens, safety=1.0, p99_bounds=None, eos_token_id=None, controls=None):
        bounds = self.wand_bounds(p99_bounds)
        seq, out, used = list(ids), [], []
        while len(out) < max_new_tokens:
            token, j = self.wand_token(self.stage_logprobs(seq)[:, -1], safety, bounds, seq, len(ids), controls)
            seq.append(token)
            out.append(token)
            used.append(j)
            if token == eos_token_id:
                break
        return out, used

    def draft(self, seq: list[int], num: int, draft_stage: int, controls=None, prompt_len=0) -> list[int]:
        """num tokens, each the argmax of stage draft_stage's own (controlled) log-probs."""
        seq, drafts = list(seq), []
        for _ in range(num):
            lp = self.stage_logprobs(seq)[draft_stage, -1]
            if controls:
                lp = controlled(lp, seq, prompt_len, **controls)
            token = int(torch.argmax(lp).item())
            seq.append(token)
            drafts.append(token)
        return drafts

    def speculative(self, ids, max_new_tokens, draft_stage=0, k_draft=3, eos_token_id=None, controls=None):
        """Draft, verify each prefix with the full PoE, keep the agreeing prefix plus one token."""
        out, accepted, proposed = [], 0, 0
        while len(out) < max_new_tokens:
            base = list(ids) + out
            k_eff = min(k_draft, max_new_tokens - len(out) - 1)
            drafts = self.draft(base, k_eff, draft_stage, controls, len(ids))
            full = [self.greedy_token(base + drafts[:i], controls=controls, prompt_len=len(ids)) for i in range(k_eff + 1)]
            a = 0
            while a < k_eff and drafts[a] == full[a]:
                a += 1
            new = drafts[:a] + [full[a]]
            accepted += a
            proposed += k_eff
            out += new
            if eos_token_id is not None and eos_token_id in new:
                out = out[: len(out) - len(new) + new.index(eos_token_id) + 1]
                break
        return out, (accepted / proposed if proposed else 0.0)

    # ---- WAND calibration ----

    def exit_gaps(self, ids: list[int]) -> list[torch.Tensor]:
        """U_j at every position of ids, for stages 0..K-2: each (T,) float64."""
        lp = self.stage_logprobs(ids)  # (K, T, V)
        full = self.score(lp, self.all_stages()).double()  # (T, V)
        gaps = []
        for j in range(self.num_stages - 1):
            score_j = self.score(lp, range(j + 1)).double()  # (T, V)
            a = torch.argmax(score_j, dim=-1, keepdim=True)  # (T, 1)
            u = (full - full.gather(-1, a)) - (score_j - score_j.gather(-1, a))  # (T, V)
            u = u.scatter(-1, a, float("-inf"))  # b != a
            gaps.append(u.max(dim=-1).values.clamp_min(0.0))
        return gaps

    def calibrate_wand(self, sequences: list[list[int]], quantile: float = 0.99) -> list[float]:
        per_stage: list[list[torch.Tensor]] = [[] for _ in range(self.num_stages - 1)]
        for ids in sequences:
            for j, u in enumerate(self.exit_gaps(ids)):
                per_stage[j].append(u)
        bounds = [torch.quantile(torch.cat(us).double(), quantile).item() for us in per_stage]
        return bounds + [0.0]

    def speculative_sample(self, ids, max_new_tokens, draft_stage=0, k_draft=3, temperature=1.0, top_k=None,
                           top_p=None, seed=0, min_p=None, controls=None) -> list[int]:
        """Speculative sampling (Leviathan et al. 2023): draft i ~ q_i, the draft stage's filtered
        distribution; accepted when u_i < p_i(x_i) / q_i(x_i), p_i the full PoE's; at the first
        rejection the token is drawn from max(p_i - q_i, 0), after k acceptances from p_k. A
        round's uniforms: one per draft, then one per acceptance test and one for the token."""
        g = torch.Generator().manual_seed(seed)

        def filtered(lp, seq):
            lp = controlled(lp, seq, len(ids), **controls) if controls else lp
            return torch.softmax(filtered_logits(lp, temperature, top_k, top_p, min_p), dim=-1)  # (V,)

        out = []
        while len(out) < max_new_tokens:
            base = list(ids) + out
            k_eff = min(k_draft, max_new_tokens - len(out) - 1)
            drafts, qs = [], []
            for _ in range(k_eff):
                seq = base + drafts
                qs.append(filtered(self.stage_logprobs(seq)[draft_stage, -1], seq))
                drafts.append(draw_at(qs[-1], uniform(g)))
            us = [uniform(g) for _ in range(k_eff + 1)]
            ps = [filtered(self.next_distribution(base + drafts[:i]), base + drafts[:i]) for i in range(k_eff + 1)]
            a, token = 0, None
            while a < k_eff and token is None:
                x = drafts[a]
                if us[a] < ps[a][x].item() / qs[a][x].item():
                    a += 1
                else:
                    token = draw_at((ps[a] - qs[a]).clamp(min=0), us[k_eff])
            out += drafts[:a] + [draw_at(ps[k_eff], us[k_eff]) if token is None else token]
        return out
