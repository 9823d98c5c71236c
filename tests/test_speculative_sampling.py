"""Speculative sampling keeps the PoE distribution exactly: a distributional test.

On a 16-token checkpoint, N seeded rows each draw their first two new tokens by speculative
sampling (stage 0 drafts, k_draft=3, temperature 0.8, top-p 0.95). The empirical joint of
(token 1, token 2) is compared with the exact one the oracle computes, p(t1) * p(t2 | t1) of the
full PoE after the same filters, by a chi-square test (cells expected below 5 pooled). A correct
sampler fails it with probability 1e-4 (the test's false-failure rate); the same test run on a
sampler that resamples from p instead of the residual after a rejection, or that accepts every
draft, must fail it.
"""

from __future__ import annotations

import pytest
import torch
from oracle import Oracle, filtered_logits

from checkpoints.writer import preset_config, random_tensors, save_checkpoint
from coordinator import PoEModel
from coordinator.core.engine import EngineConfig
from coordinator.tokenizer import Tokenizer, padded_encoding
from stage_workers import decisions
from stage_workers.sampling import draw

VOCAB = 16
PROMPT = [1, 2, 3, 4, 5]
TEMPERATURE, TOP_P = 0.8, 0.95
ALPHA = 1e-4  # the chance that a correct sampler fails the test


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vocab16")
    config = preset_config("tiny", vocab_size=VOCAB)
    tokenizer = Tokenizer(padded_encoding({bytes([i]): i for i in range(7)}, VOCAB, "small"))  # 7 bytes + 9 special
    save_checkpoint(directory, config, random_tensors(config, 3), tokenizer)
    with PoEModel.from_pretrained(directory, kv_cache_tokens=1 << 17,
                                  engine_config=EngineConfig(max_num_seqs=1024)) as model:
        yield model, Oracle(directory)


def exact_joint(oracle: Oracle) -> torch.Tensor:
    """(V, V) float64: the full PoE's filtered p(t1) * p(t2 | t1) after PROMPT."""
    def p(ids):
        return torch.softmax(filtered_logits(oracle.next_distribution(ids), TEMPERATURE, None, TOP_P), -1).double()

    first = p(PROMPT)
    return torch.stack([first[t] * p(PROMPT + [t]) if first[t] > 0 else torch.zeros(VOCAB, dtype=torch.float64)
                        for t in range(VOCAB)])


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test of counts against expected counts; cells expected below 5 are pooled."""
    observed, expected = observed.flatten().double(), expected.flatten()
    big = expected >= 5
    e = torch.cat([expected[big], expected[~big].sum().view(1)])
    o = torch.cat([observed[big], observed[~big].sum().view(1)])
    stat = ((o - e) ** 2 / e).sum()
    return float(torch.special.gammaincc(torch.tensor((len(e) - 1) / 2, dtype=torch.float64), stat / 2))


def joint_p_value(model, oracle, num_draws: int, seed: int) -> float:
    """Speculative-sample num_draws rows (row r seeded seed + r); the chi-square p-value of their
    first two tokens against the exact joint."""
    out = model.generate_speculative(torch.tensor([PROMPT] * num_draws), 0, 3, 4, do_sample=True,
                                     temperature=TEMPERATURE, top_p=TOP_P, seed=seed)  # (N, 9): a round of 3 drafts
    counts = torch.zeros(VOCAB * VOCAB, dtype=torch.long)
    counts.index_add_(0, out[:, 5] * VOCAB + out[:, 6], torch.ones(num_draws, dtype=torch.long))
    return chi_square_p_value(counts, exact_joint(oracle).flatten() * num_draws)


def test_speculative_sampling_draws_from_the_full_poe_distribution(small_vocab):
    model, oracle = small_vocab
    assert joint_p_value(model, oracle, 5000, seed=1000) > ALPHA


def resample_from_p(p, q, drafts, uniforms):
    """Wrong: after a rejection, the token comes from p rather than from max(p - q, 0)."""
    n = len(drafts)
    for i, x in enumerate(drafts):
        if uniforms[i] * float(q[i, x]) >= float(p[i, x]):
            return i, draw(p[i], uniforms[n])
    return n, draw(p[n], uniforms[n])


def accept_every_draft(p, q, drafts, uniforms):
    """Wrong: every draft is kept."""
    return len(drafts), draw(p[len(drafts)], uniforms[len(drafts)])


@pytest.mark.parametrize("wrong", [resample_from_p, accept_every_draft], ids=lambda f: f.__name__)
def test_the_distributional_test_fails_a_wrong_rejection_rule(small_vocab, monkeypatch, wrong):
    model, oracle = small_vocab
    monkeypatch.setattr(decisions, "verify_sampled", wrong)
    assert joint_p_value(model, oracle, 1500, seed=1000) < ALPHA
