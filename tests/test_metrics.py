"""Prometheus metrics (coordinator/serving/metrics.py), scraped from /metrics while requests run.

A fresh in-process model per test sits behind a gRPC server and the HTTP server. Known requests
go through both; the scrape is parsed with prometheus_client's own parser, and the counters
must equal what was sent and what the replies report (tokens, WAND exit stages, speculative
drafts), each request must land in the latency histograms once, and the gauges must follow a
request while it runs and return to zero after.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import openai
import pytest
from support import BOUNDS, prompt_ids, scrape, wait_for

from coordinator import PoEModel
from coordinator.grpc_api.server import Server
from coordinator.http_api.app import HttpServer
from tools.client import PoEClient

MODEL = "tiny"
KV_TOKENS = 128  # per worker: room for the requests below, not for one of 10 + 200 tokens
PROMPT_LEN = 10  # tokens per prompt


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def served(tiny_dir, tokenizer):
    model = PoEModel.from_pretrained(tiny_dir, kv_cache_tokens=KV_TOKENS)
    grpc_server = Server(model, tokenizer, port=0)
    http = HttpServer(model, tokenizer, port=0, model_name=MODEL)
    with openai.OpenAI(base_url=f"{http.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield SimpleNamespace(model=model, http=http, url=http.url, client=client,
                              grpc=PoEClient(grpc_server.address, timeout=60))
    http.stop()
    grpc_server.stop(0)


def test_counts_equal_what_was_sent_over_http_and_grpc(served, tokenizer):
    client, grpc = served.client, served.grpc
    for seed in (1, 2):
        client.completions.create(model=MODEL, prompt=prompt_ids(seed, PROMPT_LEN), max_tokens=5, temperature=0)
    wand = client.completions.create(model=MODEL, prompt=prompt_ids(3, PROMPT_LEN), max_tokens=6,
                                     extra_body={"poe_mode": "wand", "p99_bounds": BOUNDS})
    client.completions.create(model=MODEL, prompt="x = 1", max_tokens=3, temperature=0)
    spec = grpc.generate(token_ids=prompt_ids(4, PROMPT_LEN), max_new_tokens=8, mode="speculative", k_draft=3)
    list(grpc.stream(token_ids=prompt_ids(5, PROMPT_LEN), max_new_tokens=4))
    m = scrape(served.url)

    num_requests, prompt_tokens = 6, 5 * 10 + len(tokenizer.encode("x = 1"))
    assert value(m, "poe:request_success_total", finished_reason="length") == num_requests
    assert value(m, "poe:prompt_tokens_total") == prompt_tokens
    assert value(m, "poe:generation_tokens_total") == 5 + 5 + 6 + 3 + 8 + 4
    for name in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert value(m, f"poe:{name}_seconds_count") == num_requests, name
        assert value(m, f"poe:{name}_seconds_bucket", le="+Inf") == num_requests, name
    # one token per delivery except speculation's: tokens - 1 gaps per request at least
    assert value(m, "poe:inter_token_latency_seconds_count") >= 4 + 4 + 5 + 2 + 3
    assert value(m, "poe:engine_step_seconds_count") >= 8
    exits = Counter(wand.choices[0].stages_used)
    assert {k: value(m, "poe:wand_exits_total", stage=str(k)) for k in range(4)} == {k: exits[k] for k in range(4)}
    drafted = value(m, "poe:spec_decode_num_draft_tokens_total")
    accepted = value(m, "poe:spec_decode_num_accepted_tokens_total")
    assert drafted > 0 and accepted / drafted == pytest.approx(spec.acceptance_rate)
    assert value(m, "poe:num_requests_running") == value(m, "poe:num_requests_waiting") == 0


def test_gauges_follow_a_running_request(served):
    stream = served.client.completions.create(model=MODEL, prompt=prompt_ids(6, PROMPT_LEN), max_tokens=100,
                                              temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks)  # it runs
    m = scrape(served.url)
    assert value(m, "poe:num_requests_running") == 1 and value(m, "poe:num_requests_waiting") == 0
    usage = {k: value(m, "poe:kv_cache_usage_perc", stage=str(k), replica="0") for k in range(4)}
    assert all(0 < u <= 1 for u in usage.values()), usage  # 110 positions promised of 128 on each stage
    stream.close()  # the client goes away
    wait_for(lambda: value(scrape(served.url), "poe:num_requests_running") == 0)
    m = scrape(served.url)
    assert all(value(m, "poe:kv_cache_usage_perc", stage=str(k), replica="0") == 0 for k in range(4))
    assert value(m, "poe:request_success_total", finished_reason="abort") == 1


def test_prefix_cache_queries_hits_and_the_kv_it_keeps(served):
    ids = prompt_ids(7, 40)  # two full KV blocks of 16, then 8 positions
    for _ in range(2):
        reply = served.client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    m = scrape(served.url)
    assert value(m, "poe:prefix_cache_queries_total") == 80
    assert value(m, "poe:prefix_cache_hits_total") == reply.usage.prompt_tokens_details.cached_tokens == 32
    blocks = KV_TOKENS // 16  # each stage's pool: 8 blocks, 2 kept (the prompt's), none promised at rest
    assert all(value(m, "poe:kv_cache_cached_perc", stage=str(k), replica="0") == 2 / blocks for k in range(4))
    assert all(value(m, "poe:kv_cache_usage_perc", stage=str(k), replica="0") == 0 for k in range(4))


def test_every_ending_is_counted_by_its_reason(served):
    client, ids = served.client, prompt_ids(7, PROMPT_LEN)
    text = client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0).choices[0].text
    cut = client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0, stop=text[4:7])
    assert cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as err:  # fits the context, not a worker's KV cache
        client.completions.create(model=MODEL, prompt=ids, max_tokens=200)
    assert err.value.body["param"] == "max_tokens" and "KV" in err.value.body["message"]
    echo = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert len(echo.choices[0].logprobs.tokens) == len(ids)
    m = scrape(served.url)
    counts = {r: value(m, "poe:request_success_total", finished_reason=r)
              for r in ("length", "stop", "scored", "abort", "error")}
    assert counts == {"length": 1, "stop": 1, "scored": 1, "abort": 0, "error": 1}
    assert value(m, "poe:e2e_request_latency_seconds_count") == 3  # the ones that ran to their end


def test_stage_busy_time_counts_the_stages_a_request_ran_through(served):
    busy = lambda m: [value(m, "poe:stage_busy_seconds_total", stage=str(k)) for k in range(4)]  # noqa: E731
    first = scrape(served.url)
    assert busy(first) == [0, 0, 0, 0]
    assert [value(first, "poe:stage_replicas", stage=str(k)) for k in range(4)] == [1, 1, 1, 1]
    ids = prompt_ids(6, PROMPT_LEN)
    served.client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0,
                                     extra_body={"poe_mode": "stage", "stage": 0})
    only_first = busy(scrape(served.url))
    assert only_first[0] > 0 and only_first[1:] == [0, 0, 0], "a stage-0 drafter ran stage 0 alone"
    served.client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    full = busy(scrape(served.url))
    assert full[0] > only_first[0] and all(b > 0 for b in full[1:]), "the full model ran every stage"


def test_a_scrape_while_a_worker_cannot_answer_leaves_out_busy_time_and_nothing_else(served, monkeypatch):
    def unreadable(workers):
        raise TimeoutError("stage worker is being restarted")

    monkeypatch.setattr(served.model.backend, "busy_seconds", unreadable)
    m = scrape(served.url)
    assert not any(name == "poe:stage_busy_seconds_total" for name, _ in m)
    assert value(m, "poe:stage_replicas", stage="0") == 1 and ("poe:num_requests_running", ()) in m


def test_every_metrics_attached_to_a_loop_counts_its_requests(tiny_dir):
    """The engine loop tells each of its observers; a second Metrics joins the first instead of
    replacing it, and attaching one twice counts once."""
    from coordinator.serving.metrics import Metrics

    with PoEModel.from_pretrained(tiny_dir) as model:
        first, second = Metrics(model, "first"), Metrics(model, "second")
        for metrics in (first, second, first):
            metrics.attach(model.loop)
        assert model.loop.observers == [first, second]
        model.generate([[1, 2, 3]], 2)
        for metrics in (first, second):
            lines = metrics.exposition().decode().splitlines()
            assert f'poe:prompt_tokens_total{{model_name="{metrics.model_name}"}} 3.0' in lines
