"""Bad arguments raise ValueError naming the argument and what is allowed; the model keeps working."""

from __future__ import annotations

import math

import pytest
import torch
from support import free_blocks

from coordinator.core import requests as rq
from stage_workers.controls import Controls

PROMPT = [1, 2, 3]

BAD_CALLS = [
    ("generate_stage", dict(stage=4, max_new_tokens=2), r"stage=4 is out of range; allowed: an integer 0\.\.3"),
    ("generate_stage", dict(stage=-1, max_new_tokens=2), r"stage=-1 is out of range"),
    ("generate_prefix", dict(max_stages=0, max_new_tokens=2), r"max_stages=0 is out of range; allowed: an integer 1\.\.4"),
    ("generate_prefix", dict(max_stages=5, max_new_tokens=2), r"max_stages=5"),
    ("generate_parallel_composition", dict(stages=[0, 2], stage_weights=[1.0, 0.0], max_new_tokens=2), r"stage_weights entry 0\.0 .*finite numbers > 0"),
    ("generate_parallel_composition", dict(stages=[0, 2], stage_weights=[1.0, -2.0], max_new_tokens=2), r"stage_weights entry -2\.0"),
    ("generate_parallel_composition", dict(stages=[0, 2], stage_weights=[math.nan, 1.0], max_new_tokens=2), r"stage_weights entry nan"),
    ("generate_parallel_composition", dict(stages=[0, 2], stage_weights=[math.inf, 1.0], max_new_tokens=2), r"stage_weights entry inf"),
    ("generate_parallel_composition", dict(stages=[1, 1], max_new_tokens=2), r"stages=\[1, 1\] has duplicates"),
    ("generate_parallel_composition", dict(stages=[0, 7], max_new_tokens=2), r"stages entry=7 is out of range"),
    ("generate_parallel_composition", dict(stages=[], max_new_tokens=2), r"stages=\[\] is invalid"),
    ("generate_parallel_composition", dict(stages=[0, 1], stage_weights=[1.0], max_new_tokens=2), r"stage_weights has 1 entries for 2 stages"),
    ("generate_speculative", dict(k_draft=0, max_new_tokens=2), r"k_draft=0 is out of range; allowed: an integer 1\.\.16"),
    ("generate_speculative", dict(draft_stage=9, max_new_tokens=2), r"draft_stage=9 is out of range"),
    ("generate_wand", dict(max_new_tokens=2, safety=-1.0), r"safety=-1\.0 is invalid"),
    ("generate_wand", dict(max_new_tokens=2, p99_bounds=[1.0, 2.0]), r"p99_bounds=.* 4 numbers >= 0"),
    ("generate", dict(max_new_tokens=0), r"max_new_tokens=0 is invalid; allowed: an integer >= 1"),
    ("generate", dict(max_new_tokens=254), r"exceeds the context limit \(sequence_len\) of 256; allowed: max_new_tokens <= 253"),
    ("generate", dict(max_new_tokens=2, do_sample=True, temperature=0.0), r"temperature=0\.0 is invalid"),
    ("generate", dict(max_new_tokens=2, do_sample=True, top_p=1.5), r"top_p=1\.5 is invalid"),
    ("generate", dict(max_new_tokens=2, do_sample=True, top_k=0), r"top_k=0 is invalid"),
    ("generate", dict(max_new_tokens=2, eos_token_id=512), r"eos_token_id=512 is invalid; allowed: token ids 0\.\.511"),
    ("generate", dict(max_new_tokens=2, do_sample=True, min_p=-0.1), r"min_p=-0\.1 is invalid; allowed: None or a number in \[0, 1\]"),
    ("generate", dict(max_new_tokens=2, min_p=0.1), r"min_p=0\.1 is set but sampling is off"),
    ("generate", dict(max_new_tokens=2, repetition_penalty=0.0), r"repetition_penalty=0\.0 is invalid; allowed: a finite number > 0"),
    ("generate_wand", dict(max_new_tokens=2, presence_penalty=math.nan), r"presence_penalty=nan is invalid; allowed: a number from -2 to 2"),
    ("generate_prefix", dict(max_stages=2, max_new_tokens=2, frequency_penalty=2.5), r"frequency_penalty=2\.5 is invalid"),
    ("generate_stage", dict(stage=1, max_new_tokens=2, logit_bias={512: 1.0}), r"logit_bias key 512 is invalid; allowed: token ids 0\.\.511"),
    ("generate_speculative", dict(max_new_tokens=2, logit_bias={3: math.inf}), r"logit_bias\[3\]=inf is invalid"),
    ("generate", dict(max_new_tokens=2, min_tokens=3), r"min_tokens=3 is invalid; allowed: an integer from 0 to .* \(2\)"),
    ("generate", dict(max_new_tokens=2, stop_token_ids=[512]), r"stop_token_ids=512 is invalid; allowed: token ids 0\.\.511"),
    ("generate", dict(max_new_tokens=2, top_n=3), r"top_n is not an argument; allowed decoding controls: repetition_penalty"),
]


@pytest.mark.parametrize("method,kwargs,message", BAD_CALLS, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(BAD_CALLS)])
def test_bad_arguments_are_explained(tiny_model, method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(tiny_model, method)(PROMPT, **kwargs)


@pytest.mark.parametrize("ids,message", [
    ([1, 512], r"token id 512; allowed: 0\.\.511"),
    ([], r"empty"),
    (torch.zeros(1, 0, dtype=torch.long), r"row 0 is empty"),
    ([1] * 257, r"257 tokens; the context limit \(sequence_len\) is 256"),
    (torch.ones(2, 3), r"integer tensor"),
    ([1.5, 2], r"list of ints"),
])
def test_bad_prompts_are_explained(tiny_model, ids, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.generate(ids, 2)


def test_the_model_keeps_working_after_errors(tiny_model):
    before = tiny_model.generate(PROMPT, 5)
    for method, kwargs, _ in BAD_CALLS:
        with pytest.raises(ValueError):
            getattr(tiny_model, method)(PROMPT, **kwargs)
    assert torch.equal(tiny_model.generate(PROMPT, 5), before)
    assert free_blocks(tiny_model.engine) == tiny_model.engine.capacity


def test_logit_bias_is_clamped_to_openais_range_and_json_keys_are_token_ids(tiny_model):
    controls = rq.check_controls(tiny_model.config, 4, logit_bias={"3": 500.0, 4: -1e9, 5: 0.0})
    assert controls == Controls(logit_bias=((3, 100.0), (4, -100.0)))
    assert rq.check_controls(tiny_model.config, 4, repetition_penalty=1.0, logit_bias={}) is None, "neutral: none"
