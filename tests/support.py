"""Plain helpers shared by the suites that serve the tiny checkpoint (fixtures are in conftest.py).

Prompts; every generation mode as gRPC client arguments beside the same call on `PoEModel`;
bad gRPC requests with the field their error must name; KV blocks read from outside the engine
(the workers' and the engine's promises) and waiting until they are free; polling a condition;
scraping /metrics. Fake stage workers and an engine over them are in fakes.py, the
full-recompute oracle in oracle.py.
"""

from __future__ import annotations

import math
import time
import urllib.request

import torch
from prometheus_client.parser import text_string_to_metric_families

from coordinator.core.requests import MAX_K_DRAFT
from protos import poe_serving_pb2 as pb
from tools.client import build_request

VOCAB, SEQ_LEN, NUM_STAGES = 512, 256, 4  # the tiny preset (tests/test_reliability.py checks them)
TOKEN = "s3cret-token"  # the bearer token of the servers that ask for one


def prompt_ids(seed: int, length: int = 20) -> list[int]:
    """`length` token ids below 500, the same for the same seed."""
    return torch.randint(0, 500, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- every mode, served and in process --------------------------------------------------------
BOUNDS = [0.6, 0.6, 0.6, 0.0]
# name -> (client kwargs, reference call on a (1, T) prompt tensor)
MODES = {
    "full": (dict(mode="full"), lambda m, ids, n, **c: m.generate(ids, n, **c)),
    "prefix": (dict(mode="prefix", max_stages=2), lambda m, ids, n, **c: m.generate_prefix(ids, 2, n, **c)),
    "stage": (dict(mode="stage", stage=1), lambda m, ids, n, **c: m.generate_stage(ids, 1, n, **c)),
    "composition": (dict(mode="composition", stages=[3, 0], stage_weights=[1.0, 0.5]),
                    lambda m, ids, n, **c: m.generate_parallel_composition(ids, [3, 0], [1.0, 0.5], n, **c)),
    "wand": (dict(mode="wand", safety=1.0, p99_bounds=BOUNDS),
             lambda m, ids, n, **c: m.generate_wand(ids, n, 1.0, BOUNDS, **c)),
    "speculative": (dict(mode="speculative", draft_stage=0, k_draft=3),
                    lambda m, ids, n, **c: m.generate_speculative(ids, 0, 3, n, **c)),
    "sampled": (dict(mode="full", temperature=0.8, top_k=50, top_p=0.9, seed=7),
                lambda m, ids, n, **c: m.generate(ids, n, do_sample=True, temperature=0.8, top_k=50, top_p=0.9,
                                                  seed=7, **c)),
}


def new_tokens(model, mode: str, ids: list[int], n: int, **controls) -> list[int]:
    """The `n` tokens `model` (the in-process reference) adds to `ids` in `mode` (with the decoding
    controls given): what a served reply must carry."""
    return MODES[mode][1](model, torch.tensor([ids]), n, **controls)[0, len(ids):].tolist()


# decoding controls that change the tiny checkpoint's tokens, by their Python names
CONTROLS = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5, logit_bias={5: 3.0, 7: -100.0})


# ---- bad gRPC requests -------------------------------------------------------------------------
NAN, INF = math.nan, math.inf


def gen(**kwargs) -> pb.GenerateRequest:
    return build_request(**{"token_ids": [1, 2, 3], "max_new_tokens": 2, **kwargs})


def edited(message, edit):
    edit(message)
    return message


def non_utf8_prompt(message) -> bytes:
    """`message` (whose prompt is "AB") serialized with the prompt's two bytes made invalid UTF-8."""
    data = message.SerializeToString()
    assert data.count(b"\x0a\x02AB") == 1
    return data.replace(b"\x0a\x02AB", b"\x0a\x02\xc3\x28")


def comp(stages, weights=None) -> pb.GenerateRequest:
    return gen(mode="composition", stages=stages, stage_weights=weights)


# (case, payload: a message or raw bytes, the field the details must name). Cases already in
# tests/test_grpc.py (stage 9, max_stages 0, stages [0, 0], a NaN weight, k_draft 10000, token
# 10**6, max_new_tokens 10**6) are not repeated.
BAD_GENERATE = [
    ("max_stages above the stage count", gen(mode="prefix", max_stages=NUM_STAGES + 1), "max_stages"),
    ("max_stages at the uint32 limit", gen(mode="prefix", max_stages=2**32 - 1), "max_stages"),
    ("stage at the uint32 limit", gen(mode="stage", stage=2**32 - 1), "stage"),
    ("stages empty", edited(gen(), lambda m: m.composition.SetInParent()), "stages"),
    ("stages entry out of range", comp([0, NUM_STAGES]), "stages"),
    ("stages duplicated among three", comp([1, 3, 1], [1.0] * 3), "stages"),
    ("stage_weights zero", comp([0, 1], [1.0, 0.0]), "stage_weights"),
    ("stage_weights negative", comp([0, 1], [-1.0, 1.0]), "stage_weights"),
    ("stage_weights inf", comp([0, 1], [INF, 1.0]), "stage_weights"),
    ("stage_weights 1e-310 (0 in fp32)", comp([0, 1], [1e-310, 1e-310]), "stage_weights"),
    ("stage_weights 1e300 (inf in fp32)", comp([0, 1], [1e300, 1.0]), "stage_weights"),
    ("stage_weights fewer than stages", comp([0, 1, 2], [1.0, 1.0]), "stage_weights"),
    ("stage_weights more than stages", comp([2], [1.0, 1.0]), "stage_weights"),
    ("k_draft one above the maximum", gen(mode="speculative", k_draft=MAX_K_DRAFT + 1), "k_draft"),
    ("draft_stage out of range", gen(mode="speculative", draft_stage=NUM_STAGES), "draft_stage"),
    ("wand safety negative", gen(mode="wand", safety=-0.5), "safety"),
    ("wand safety NaN", gen(mode="wand", safety=NAN), "safety"),
    ("wand safety inf", gen(mode="wand", safety=INF), "safety"),
    ("p99_bounds too few", gen(mode="wand", p99_bounds=[0.5] * (NUM_STAGES - 1)), "p99_bounds"),
    ("p99_bounds too many", gen(mode="wand", p99_bounds=[0.5] * (NUM_STAGES + 1)), "p99_bounds"),
    ("p99_bounds negative", gen(mode="wand", p99_bounds=[0.6, -0.1, 0.6, 0.0]), "p99_bounds"),
    ("p99_bounds NaN", gen(mode="wand", p99_bounds=[0.6, NAN, 0.6, 0.0]), "p99_bounds"),
    ("neither prompt nor token_ids", pb.GenerateRequest(max_new_tokens=2), "input"),
    ("token_ids empty", edited(pb.GenerateRequest(max_new_tokens=2), lambda m: m.token_ids.SetInParent()), "token_ids"),
    ("token id equal to the vocab size", gen(token_ids=[1, VOCAB]), "token_ids"),
    ("token_ids longer than the context", gen(token_ids=[1] * (SEQ_LEN + 1)), "token_ids"),
    ("prompt longer than the context", gen(token_ids=None, prompt=" x" * (2 * SEQ_LEN)), "prompt"),
    ("prompt filling the context", gen(token_ids=[1] * SEQ_LEN, max_new_tokens=1), "max_new_tokens"),
    ("max_new_tokens one past the context", gen(token_ids=[1] * 200, max_new_tokens=SEQ_LEN - 199), "max_new_tokens"),
    ("stop token id equal to the vocab size", gen(stop_token_ids=[3, VOCAB]), "stop_token_ids"),
    ("temperature negative", gen(temperature=-0.5), "temperature"),
    ("temperature NaN", gen(temperature=NAN), "temperature"),
    ("temperature inf", gen(temperature=INF), "temperature"),
    ("temperature 1e-300 (0 in fp32)", gen(temperature=1e-300), "temperature"),
    ("top_p above 1", gen(temperature=0.8, top_p=1.5), "top_p"),
    ("top_p negative", gen(temperature=0.8, top_p=-0.2), "top_p"),
    ("top_p NaN", gen(temperature=0.8, top_p=NAN), "top_p"),
    ("logprobs above 20", gen(logprobs=21), "logprobs"),
    ("structured json not a schema", gen(structured_outputs={"json": '{"type": "objectx"}'}), "structured_outputs"),
    ("structured regex unclosed", gen(structured_outputs={"regex": "[a-"}), "structured_outputs"),
    ("structured grammar without a rule", gen(structured_outputs={"grammar": "root ::= "}), "structured_outputs"),
    ("structured json and regex", gen(structured_outputs={"json": "{}", "regex": "a+"}), "structured_outputs"),
    ("structured outputs empty", gen(structured_outputs={}), "structured_outputs"),
    ("min_p above 1", gen(temperature=0.8, min_p=1.5), "min_p"),
    ("repetition_penalty zero", gen(repetition_penalty=0.0), "repetition_penalty"),
    ("repetition_penalty NaN", gen(repetition_penalty=NAN), "repetition_penalty"),
    ("presence_penalty above 2", gen(presence_penalty=2.5), "presence_penalty"),
    ("frequency_penalty NaN", gen(frequency_penalty=NAN), "frequency_penalty"),
    ("logit_bias token id equal to the vocab size", gen(logit_bias={VOCAB: 1.0}), "logit_bias"),
    ("logit_bias NaN", gen(logit_bias={3: NAN}), "logit_bias"),
    ("min_tokens above max_new_tokens", gen(max_new_tokens=2, min_tokens=3), "min_tokens"),
    ("sampling with WAND", gen(mode="wand", temperature=0.8), "sampling"),
    ("cache_salt empty", gen(cache_salt=""), "cache_salt"),
    ("cache_salt over 1024 characters", gen(cache_salt="s" * 1025), "cache_salt"),
    ("prompt not UTF-8", non_utf8_prompt(gen(token_ids=None, prompt="AB")), "prompt"),
    ("bytes that are not a message", b"\xff\xff\xff\xff", "request"),
]


# ---- KV blocks, read from outside the engine ---------------------------------------------------
def free_blocks(engine) -> list[int]:
    """Per stage: KV blocks not promised to a running sequence, over all its replicas (blocks the
    prefix cache keeps count as free: they are evicted when room is needed)."""
    return [stage.num_blocks - sum(stage.promised) for stage in engine.stages]


def stage_infos(model) -> list:
    """One `WorkerInfo` per stage, as the workers report it (a replicated stage's KV summed over its replicas)."""
    return [stage.info() for stage in model.engine.stages]


def kv_in_use(model) -> int:
    """KV blocks held on the workers beyond those the prefix cache keeps, plus blocks the engine
    has promised to sequences (0 at rest)."""
    kept = sum(sum(stage.cached) for stage in model.engine.stages)
    held = sum(w.kv_num_blocks - w.kv_free_blocks for w in stage_infos(model)) - kept
    promised = sum(cap - free for cap, free in zip(model.engine.capacity, free_blocks(model.engine)))
    return held + promised


def wait_until_kv_free(model, timeout: float = 10.0) -> float:
    """Seconds until every worker's free blocks and the engine's free blocks are back to capacity
    and the engine holds no sequence (KV is also free for a moment while aborts of waiting requests
    are still queued for the engine loop and it has yet to admit the next ones)."""
    t0 = time.perf_counter()
    while kv_in_use(model) or model.engine.has_work():
        workers = [(w.kv_free_blocks, w.kv_num_blocks) for w in stage_infos(model)]
        assert time.perf_counter() - t0 < timeout, (
            f"KV not released after {timeout}s: (free, total) blocks per stage {workers}, "
            f"engine {free_blocks(model.engine)} free of {model.engine.capacity}, "
            f"{len(model.engine.waiting)} sequences waiting and {len(model.engine.running)} running"
        )
        time.sleep(0.005)
    return time.perf_counter() - t0


# ---- waiting and scraping ---------------------------------------------------------------------
def wait_for(condition, timeout: float = 10.0) -> None:
    """Poll `condition()` until it holds; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels but model_name): value}."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
