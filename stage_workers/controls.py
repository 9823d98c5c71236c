"""Decoding controls applied where a token is chosen: penalties, bias and `min_tokens`, on the
normalized Log-OP distribution of the deciding stage, before the greedy or sampled choice.

The rules (vLLM's names, OpenAI's and Hugging Face's semantics), in this order, for the token
after position q of a sequence whose tokens are t_0..t_q and whose prompt is t_0..t_{P-1}:
- `repetition_penalty` r: every token among t_0..t_q has its log-prob multiplied by r (log-probs
  are <= 0, so r > 1 makes a seen token less likely: HF's rule for negative scores);
- `presence_penalty` a and `frequency_penalty` f over the output t_P..t_q: a token seen c times
  there loses a * (c > 0) + f * c;
- `logit_bias`: a fixed amount added per token id;
- `min_tokens` m: while fewer than m tokens are generated (q + 1 - P < m), the stop ids are
  impossible.
A structured request's grammar then leaves only the tokens it allows (`apply_masks`; the
coordinator keeps the grammar and sends the masks). The result is a ranking score: greedy takes
its argmax, sampling its softmax after temperature (stage_workers/sampling.py). The deciding
worker keeps the tokens of every position it has computed (`StageState.history`), so nothing but
the controls themselves crosses the wire. Pure functions; nothing here knows stages, workers or
messages.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Controls(NamedTuple):
    repetition_penalty: float = 1.0  # > 0; 1: none
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    min_tokens: int = 0
    stop_ids: tuple[int, ...] = ()  # impossible before min_tokens (the request's stop token ids)
    prompt_len: int = 0  # positions < prompt_len are the prompt (P)

    @property
    def uses_history(self) -> bool:
        """Whether the rule reads the tokens before the position (penalties, min_tokens)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.min_tokens > 0)


def apply_controls(logprobs: torch.Tensor, controls: Controls, history: list[int], positions: list[int]
                   ) -> torch.Tensor:
    """logprobs: (n, V) normalized log-probs for the token after each of `positions`; history: the
    sequence's tokens at positions 0..max(positions) at least. (n, V) fp32 scores to choose from."""
    out = logprobs.float().clone()  # (n, V)
    V, P = out.shape[-1], controls.prompt_len
    for row, q in zip(out, positions):
        seen = history[: q + 1]
        if controls.repetition_penalty != 1.0:
            row[torch.tensor(sorted(set(seen)), device=out.device)] *= controls.repetition_penalty
        if controls.presence_penalty or controls.frequency_penalty:
            counts = torch.bincount(torch.tensor(seen[P:], dtype=torch.long), minlength=V).to(out.device).float()
            row -= controls.frequency_penalty * counts + controls.presence_penalty * (counts > 0).float()
        if controls.stop_ids and q + 1 - P < controls.min_tokens:  # -inf stays -inf under the bias
            row[torch.tensor(controls.stop_ids, device=out.device)] = float("-inf")
    if controls.logit_bias:
        ids, bias = zip(*controls.logit_bias)
        out[:, torch.tensor(ids, device=out.device)] += torch.tensor(bias, device=out.device)  # (n, len(ids))
    return out


def apply_masks(scores: torch.Tensor, masks: tuple[bytes, ...]) -> torch.Tensor:
    """scores: (n, V); masks: n packed bitmasks of the tokens a grammar allows (xgrammar's layout:
    bit t % 32 of int32 word t // 32 is token t). (n, V) fp32 with every other token at -inf.
    Unpacked here rather than by xgrammar, whose import (seconds) would stall a worker's steps."""
    words = torch.frombuffer(bytearray(b"".join(masks)), dtype=torch.int32).view(len(masks), -1)  # (n, W)
    bits = (words[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1  # (n, W, 32)
    allowed = bits.flatten(1)[:, : scores.shape[-1]].bool().to(scores.device)  # (n, V)
    return scores.float().masked_fill(~allowed, float("-inf"))
