"""The OpenAI-compatible HTTP front end to end, with the `openai` package as the client.

A gRPC server and the HTTP server share one in-process model (and its engine loop); a separate
in-process `PoEModel` on the same checkpoint is the reference. Generated tokens are read from
each choice's `token_ids` (vLLM's `return_token_ids`) and must be exactly the reference's in
every mode, whole and streamed; echoed log-probs must be gRPC Score's; stop strings cut the
text exactly; bad input is 400 naming the field (every gRPC bad-input case that has an HTTP
form, and HTTP's own), never 500; and the server keeps serving after each.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import grpc
import openai
import pytest
import torch
from support import (
    BAD_GENERATE,
    CONTROLS,
    MODES,
    SEQ_LEN,
    TOKEN,
    kv_in_use,
    new_tokens,
    prompt_ids,
    scrape,
    wait_for,
    wait_until_kv_free,
)

from coordinator import PoEModel
from coordinator.core.requests import GenerationRequest, full_mode
from coordinator.grpc_api.server import Server
from coordinator.http_api.app import HttpServer, api_error, serve_http
from coordinator.http_api.schema import MAX_LOGPROBS
from coordinator.serving.security import ServerSecurity
from protos import poe_serving_pb2 as pb
from stage_workers.messages import WorkerLost
from tools.client import PoEClient

MODEL = "tiny"
GREEDY_ONLY = ("wand",)


@pytest.fixture(scope="module")
def served(tiny_dir, tokenizer):
    """gRPC and HTTP over one in-process model."""
    model = PoEModel.from_pretrained(tiny_dir)
    grpc_server = Server(model, tokenizer, port=0)
    http = HttpServer(model, tokenizer, port=0, model_name=MODEL)
    yield SimpleNamespace(model=model, grpc=PoEClient(grpc_server.address, timeout=60), http=http, url=http.url)
    http.stop()
    grpc_server.stop(0)


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def mode_fields(mode: str) -> dict:
    """The gRPC suite's arguments for a mode as HTTP body fields (greedy unless sampled)."""
    fields = dict(MODES[mode][0])
    fields["poe_mode"] = fields.pop("mode")
    if mode not in GREEDY_ONLY:
        fields.setdefault("temperature", 0)
    return fields


def call(url: str, path: str, body: dict | bytes | None = None, token: str | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    """A raw request (bytes go as they are): the status and the JSON answer."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def names(field: str, message: str) -> bool:
    return re.search(rf"\b{re.escape(field)}\b", message) is not None


def assert_still_serving(client, reference) -> None:
    ids = prompt_ids(seed=5)
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0,
                                      extra_body={"return_token_ids": True})
    assert reply.choices[0].token_ids == new_tokens(reference, "full", ids, 3)


# ---- tokens in every mode --------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_gives_the_in_process_models_tokens(client, reference, tokenizer, mode, stream):
    ids, n = prompt_ids(seed=len(mode)), 12
    fields = mode_fields(mode)
    args = dict(model=MODEL, prompt=ids, max_tokens=n, extra_body={**fields, "return_token_ids": True})
    want = new_tokens(reference, mode, ids, n)
    if not stream:
        reply = client.completions.create(**args)
        choice = reply.choices[0]
        tokens, text, finish, usage = choice.token_ids, choice.text, choice.finish_reason, reply.usage
        assert choice.prompt_token_ids == ids
    else:
        chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
        parts = [c.choices[0] for c in chunks[:-1]]
        tokens = [t for p in parts for t in p.token_ids]
        text, finish = "".join(p.text for p in parts), parts[-1].finish_reason
        assert parts[0].prompt_token_ids == ids and all(p.finish_reason is None for p in parts[:-1])
    assert tokens == want
    assert text == tokenizer.decode(want) and finish == "length"
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(ids), n, len(ids) + n)


def test_wand_stages_and_speculative_acceptance_come_back(client, reference):
    ids = prompt_ids(seed=9)
    wand = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, extra_body=mode_fields("wand"))
    _, used = reference.generate_wand(torch.tensor([ids]), 10, 1.0, MODES["wand"][0]["p99_bounds"],
                                      return_stages_used=True)
    assert wand.choices[0].stages_used == used[0].tolist()
    spec = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, extra_body=mode_fields("speculative"))
    _, rate = reference.generate_speculative(torch.tensor([ids]), 0, 3, 10, return_acceptance=True)
    assert spec.choices[0].acceptance_rate == pytest.approx(rate)


def test_text_prompts_get_bos_and_choices_are_prompt_major_with_seed_plus_index(client, reference, tokenizer):
    prompts = ["def add(a, b):", "import os"]
    reply = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, temperature=0.8, top_p=0.9,
                                      seed=11, extra_body={"return_token_ids": True})
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for c in reply.choices:
        ids = tokenizer.encode(prompts[c.index // 2])
        assert c.prompt_token_ids == ids and ids[0] == tokenizer.bos_token_id
        want = reference.generate(torch.tensor([ids]), 6, do_sample=True, temperature=0.8, top_p=0.9, seed=11 + c.index)
        assert c.token_ids == want[0, len(ids):].tolist()
    assert reply.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)  # once per prompt
    assert reply.usage.completion_tokens == 4 * 6


def test_models_health_and_readiness(served, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert call(served.url, "/health") == (200, {"status": "ok"})
    assert call(served.url, "/ready") == (200, {"status": "ready"})
    served.model.engine.stages_down.add(2)  # as after a worker lost for good
    try:
        status, body = call(served.url, "/ready")
        assert status == 503 and "[2]" in body["error"]["message"] and body["error"]["code"] == "not_ready"
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert err.value.status_code == 503
    finally:
        served.model.engine.stages_down.discard(2)
    assert call(served.url, "/ready")[0] == 200


def test_tokenize_and_detokenize_over_http_and_grpc(served, tokenizer):
    text = "def add(a, b):\n    return a + b  # é"
    ids = tokenizer.encode(text)
    status, reply = call(served.url, "/tokenize", {"model": MODEL, "prompt": text, "return_token_strs": True})
    assert status == 200 and reply["tokens"] == ids and reply["count"] == len(ids)
    assert reply["max_model_len"] == served.model.config.sequence_len
    assert reply["token_strs"][0] == "<|bos|>" and "".join(reply["token_strs"][1:]).replace("\ufffd", "") in text
    assert call(served.url, "/tokenize", {"prompt": text, "add_special_tokens": False})[1] == {
        "count": len(ids) - 1, "max_model_len": served.model.config.sequence_len, "tokens": ids[1:]}
    assert call(served.url, "/detokenize", {"model": MODEL, "tokens": ids}) == (200, {"prompt": "<|bos|>" + text})
    grpc_ids = served.grpc.tokenize(text, return_token_strs=True)
    assert list(grpc_ids.token_ids) == ids and list(grpc_ids.token_strs) == reply["token_strs"]
    assert list(served.grpc.tokenize(text, add_special_tokens=False).token_ids) == ids[1:]
    assert served.grpc.detokenize(ids[1:]) == text and served.grpc.detokenize([]) == ""
    vocab = served.model.config.vocab_size
    status, reply = call(served.url, "/detokenize", {"tokens": [1, vocab]})
    assert status == 400 and reply["error"]["param"] == "tokens" and f"allowed: token ids 0..{vocab - 1}" in reply[
        "error"]["message"]
    assert call(served.url, "/tokenize", {"model": "other", "prompt": "x"})[0] == 404
    assert call(served.url, "/tokenize", {"prompt": 3})[0] == 400
    with pytest.raises(grpc.RpcError) as err:
        served.grpc.detokenize([vocab + 5])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in err.value.details()


def test_health_fails_only_when_the_engine_loop_is_down(tiny_dir, tokenizer):
    """Liveness: a stage down is readiness' business (test above); a loop that ended is not live."""
    model = PoEModel.from_pretrained(tiny_dir)
    http = HttpServer(model, tokenizer, port=0, model_name=MODEL)
    try:
        assert call(http.url, "/health") == (200, {"status": "ok"})
        model.loop.stop()
        status, reply = call(http.url, "/health")
        assert status == 503 and reply["error"]["code"] == "engine_loop_down", reply
        assert call(http.url, "/ready")[0] == 503
    finally:
        http.stop()


def test_a_drain_lets_http_streams_finish_and_refuses_new_completions(tiny_dir, tokenizer, reference):
    """One drain for both fronts (as `poe-serve serve` on SIGTERM): the gRPC server's drain waits
    for an HTTP stream in flight, which gets every token, while /ready and new completions are 503."""
    model = PoEModel.from_pretrained(tiny_dir)
    grpc_server = Server(model, tokenizer, port=0)
    http = HttpServer(model, tokenizer, port=0, model_name=MODEL, drain=grpc_server.admission)
    ids = prompt_ids(seed=60)
    last, compute = model.workers[-1], model.workers[-1].extend
    last.extend = lambda batch: time.sleep(0.05) or compute(batch)  # the stream lasts 3 s: still in flight below
    try:
        stream = urllib.request.urlopen(urllib.request.Request(
            http.url + "/v1/completions", json.dumps(body(prompt=ids, max_tokens=60, temperature=0, stream=True,
                                                          return_token_ids=True)).encode(),
            {"Content-Type": "application/json"}), timeout=60)
        lines = [stream.readline()]  # the first tokens came: in flight
        left: list[int] = []
        drainer = threading.Thread(target=lambda: left.append(grpc_server.drain(time.monotonic() + 60)))
        drainer.start()
        wait_for(lambda: grpc_server.admission.draining)
        status, reply = call(http.url, "/ready")
        assert status == 503 and "draining" in reply["error"]["message"]
        status, reply = call(http.url, "/v1/completions", body(prompt=ids, max_tokens=2))
        assert status == 503 and reply["error"]["code"] == "draining", reply
        assert reply["error"]["type"] == "service_unavailable" and "shutting down" in reply["error"]["message"]
        assert call(http.url, "/health")[0] == 200  # draining is not a liveness failure
        assert drainer.is_alive()  # waiting for the stream
        lines += stream.readlines()
        events = [line[len(b"data: "):].strip() for line in lines if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        tokens = [t for e in events[:-1] for t in json.loads(e)["choices"][0].get("token_ids", [])]
        assert tokens == new_tokens(reference, "full", ids, 60)
        drainer.join(30)
        assert left == [0]
    finally:
        http.stop()
        grpc_server.stop(0)
        model.loop.stop()


def test_engine_errors_map_to_openai_statuses():
    assert api_error(WorkerLost(1, "actor died", restarted=False)).status == 503
    assert api_error(ValueError("prompt: too long"), "prompt").param == "prompt"
    assert api_error(RuntimeError("a bug")).status == 500


# ---- log-probs and stop strings ----------------------------------------------------------------
def test_echoed_prompt_logprobs_are_grpc_scores_and_top1_tells_greedy(served, client, reference, tokenizer):
    """lm-eval-harness's loglikelihood request: echo, no new tokens, logprobs=1."""
    ids = prompt_ids(seed=21, length=24)
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                      extra_body={"return_tokens_as_token_ids": True})
    lp = reply.choices[0].logprobs
    assert lp.tokens == [f"token_id:{t}" for t in ids] and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(list(served.grpc.score(token_ids=ids).token_logprobs), abs=1e-5)
    greedy = reference.forward(torch.tensor([ids]))[0].argmax(-1).tolist()  # (T,) argmax after each position
    for i in range(1, len(ids)):
        top = lp.top_logprobs[i]
        assert len(top) <= 2 and top[f"token_id:{ids[i]}"] == pytest.approx(lp.token_logprobs[i])
        assert (max(top, key=top.get) == f"token_id:{ids[i]}") == (greedy[i - 1] == ids[i])
    assert reply.choices[0].text == tokenizer.decode(ids) and reply.usage.completion_tokens == 0


def test_generated_tokens_logprobs_are_the_scores_of_prompt_plus_completion(served, client, tokenizer):
    prompt = "x = 1\n"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=3,
                                      extra_body={"return_token_ids": True})
    choice = reply.choices[0]
    ids = tokenizer.encode(prompt) + choice.token_ids
    scores = list(served.grpc.score(token_ids=ids).token_logprobs)
    assert choice.logprobs.token_logprobs == pytest.approx(scores[-5:], abs=1e-5)
    assert choice.logprobs.tokens == [tokenizer.decode([t], skip_special_tokens=False) for t in choice.token_ids]
    assert all(len(top) <= 4 for top in choice.logprobs.top_logprobs)
    # greedy: each generated token is its position's most likely one
    assert all(max(top.values()) == pytest.approx(lp) for top, lp in
               zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs))
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + choice.text


def mode_logprobs(reference, ids: list[int], stages: list[int], start: int) -> list[float]:
    """The Log-OP of `stages` (equal weights) at each position, normalized: log p of ids[start:]."""
    logits = reference.stage_logits(torch.tensor([ids]), tuple(stages))[0]
    lp = torch.log_softmax(sum(torch.log_softmax(logits[k], -1) for k in stages) / len(stages), -1)  # (T, V)
    return [float(lp[t - 1, ids[t]]) for t in range(start, len(ids))]


@pytest.mark.parametrize("mode", ["full", "prefix", "wand", "speculative", "sampled"])
def test_streamed_logprobs_are_the_whole_completions_and_the_modes_own(served, client, reference, tokenizer, mode):
    ids = prompt_ids(seed=52, length=20)
    fields = mode_fields(mode)
    openai_names = {k: fields.pop(k) for k in ("temperature", "top_p", "seed") if k in fields}
    kwargs = dict(model=MODEL, prompt=ids, max_tokens=8, logprobs=2, **openai_names,
                  extra_body=dict(fields, return_token_ids=True))
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs)]
    streamed = [c.logprobs for c in chunks if c.logprobs is not None]
    assert [t for lp in streamed for t in lp.tokens] == whole.logprobs.tokens
    assert [v for lp in streamed for v in lp.token_logprobs] == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)
    assert [v.keys() for lp in streamed for v in lp.top_logprobs] == [v.keys() for v in whole.logprobs.top_logprobs]
    assert [o for lp in streamed for o in lp.text_offset] == whole.logprobs.text_offset
    assert [t for c in chunks for t in c.token_ids or []] == whole.token_ids
    if mode in ("full", "prefix", "speculative"):  # the distribution each token was chosen from
        stages = [0, 1] if mode == "prefix" else list(range(4))
        expected = mode_logprobs(reference, ids + whole.token_ids, stages, len(ids))
        assert whole.logprobs.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert all(len(top) <= 3 for top in whole.logprobs.top_logprobs)


def test_echo_with_streamed_logprobs_scores_the_prompt_first(served, client, tokenizer):
    ids = prompt_ids(seed=53, length=12)
    kwargs = dict(model=MODEL, prompt=ids, max_tokens=4, temperature=0, logprobs=1, echo=True)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    streamed = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kwargs)]
    assert streamed[0].token_logprobs[0] is None and len(streamed[0].tokens) >= len(ids)
    flat = [v for lp in streamed if lp for v in lp.token_logprobs]
    assert flat[0] is None and flat[1:] == pytest.approx(whole.token_logprobs[1:], abs=1e-5)
    assert whole.token_logprobs[1:len(ids)] == pytest.approx(list(served.grpc.score(token_ids=ids).token_logprobs)[
        : len(ids) - 1], abs=1e-5)


def _stop_case(reference, tokenizer, ids: list[int], n: int) -> tuple[list[int], str, str]:
    """The reference tokens and text, and a 3-character stop string that straddles a token boundary
    and first occurs there."""
    tokens = new_tokens(reference, "full", ids, n)
    text = tokenizer.decode(tokens)
    for j in range(6, n):
        k = len(tokenizer.decode(tokens[:j]))
        stop = text[k - 1 : k + 2]
        if len(stop) == 3 and text.find(stop) == k - 1:
            return tokens, text, stop
    pytest.fail("no usable stop string in the reference text")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_strings_cut_the_text_exactly_and_free_the_sequence(served, client, reference, tokenizer, stream):
    ids, n = prompt_ids(seed=33), 40
    tokens, text, stop = _stop_case(reference, tokenizer, ids, n)
    cut = text.find(stop)
    kept = next(j for j in range(1, n + 1) if stop in tokenizer.decode(tokens[:j]))
    args = dict(model=MODEL, prompt=ids, max_tokens=n, temperature=0, stop=["never seen \x07", stop],
                extra_body={"return_token_ids": True})
    if stream:
        parts = [c.choices[0] for c in client.completions.create(**args, stream=True)]
        got_text, got_tokens = "".join(p.text for p in parts), [t for p in parts for t in p.token_ids]
        finish = parts[-1].finish_reason
    else:
        choice = client.completions.create(**args).choices[0]
        got_text, got_tokens, finish = choice.text, choice.token_ids, choice.finish_reason
    assert got_text == text[:cut] and not got_text.endswith(stop[0] + stop[1])
    assert got_tokens == tokens[:kept] and finish == "stop"
    wait_until_kv_free(served.model)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("mode", list(MODES))
def test_decoding_controls_give_the_in_process_models_tokens(client, reference, mode, stream):
    ids = prompt_ids(seed=51, length=8) * 3  # repeats, where the penalties bite
    fields = mode_fields(mode)
    openai_names = {k: fields.pop(k) for k in ("temperature", "top_p", "seed") if k in fields}
    extra = dict(fields, return_token_ids=True, repetition_penalty=CONTROLS["repetition_penalty"], min_tokens=4,
                 **({"min_p": 0.02} if mode == "sampled" else {}))
    reply = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=9, stream=stream, presence_penalty=CONTROLS["presence_penalty"],
        frequency_penalty=CONTROLS["frequency_penalty"], logit_bias={str(k): v for k, v in CONTROLS["logit_bias"].items()},
        extra_body=extra, **openai_names)
    tokens = [t for chunk in reply for t in chunk.choices[0].token_ids or []] if stream else reply.choices[0].token_ids
    controls = dict(CONTROLS, min_tokens=4) | ({"min_p": 0.02} if mode == "sampled" else {})
    assert tokens == new_tokens(reference, mode, ids, 9, **controls)
    if mode == "full":
        assert tokens != new_tokens(reference, mode, ids, 9), "the controls changed the tokens"


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "s": {"enum": ["on", "off"]}}, "required": ["n", "s"]}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_structured_output_gives_the_in_process_models_tokens(client, reference, tokenizer, stream):
    ids = prompt_ids(seed=55, length=12)
    cases = [({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}},
              {"json": SCHEMA}, "full"),
             ({"response_format": {"type": "json_object"}}, {"json": {"type": "object"}}, "speculative"),
             ({"structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}}, {"regex": "[a-c]{3}-[0-9]{2}"}, "wand"),
             ({"structured_outputs": {"choice": ["red", "green"]}}, {"choice": ["red", "green"]}, "prefix")]
    for http_fields, python, mode in cases:  # completions take both as extra fields, as vLLM's do
        extra = {**mode_fields(mode), "return_token_ids": True, **http_fields}
        temperature = extra.pop("temperature", None)
        reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=40, stream=stream, extra_body=extra,
                                          **({} if temperature is None else {"temperature": temperature}))
        tokens = [t for chunk in reply for t in chunk.choices[0].token_ids or []] if stream \
            else reply.choices[0].token_ids
        assert tokens == new_tokens(reference, mode, ids, 40, structured_outputs=python), mode
        if tokens[-1] == tokenizer.bos_token_id:  # ended: the grammar was complete
            text = tokenizer.decode(tokens)
            assert json.loads(text) if "json" in python else text in python.get("choice", [text])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_repeated_prompt_reports_cached_tokens_and_salts_keep_tenants_apart(client, reference, stream):
    ids = prompt_ids(seed=90 + stream, length=40)  # two full KV blocks of 16, then 8 positions
    want = new_tokens(reference, "full", ids, 4)

    def completion(salt):
        args = dict(model=MODEL, prompt=ids, max_tokens=4, temperature=0,
                    extra_body={"return_token_ids": True, "cache_salt": salt})
        if not stream:
            reply = client.completions.create(**args)
            return reply.choices[0].token_ids, reply.usage
        chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        return [t for c in chunks[:-1] for t in c.choices[0].token_ids], chunks[-1].usage

    for salt, cached in [("tenant-a", 0), ("tenant-a", 32), ("tenant-b", 0), (None, 0), (None, 32)]:
        tokens, usage = completion(salt)
        assert tokens == want and usage.prompt_tokens_details.cached_tokens == cached, salt


def test_stop_token_ids_end_the_choice_with_the_token(client, reference):
    ids = prompt_ids(seed=34)
    tokens = new_tokens(reference, "full", ids, 10)
    choice = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0,
                                       extra_body={"stop_token_ids": [tokens[4]], "return_token_ids": True}).choices[0]
    assert choice.token_ids == tokens[: tokens.index(tokens[4]) + 1] and choice.finish_reason == "stop"


# ---- bad input ---------------------------------------------------------------------------------
GRPC_TO_HTTP_FIELD = {"token_ids": "prompt", "input": "prompt", "max_new_tokens": "max_tokens",
                      "sampling": "temperature"}


def http_body(message: pb.GenerateRequest) -> dict:
    """A gRPC GenerateRequest as the same request over HTTP (proto3's zeros as its defaults)."""
    which, mode, s = message.WhichOneof("input"), message.WhichOneof("mode"), message.sampling
    fields = {"prompt": None if which is None else message.prompt if which == "prompt" else list(message.token_ids.ids),
              "max_tokens": message.max_new_tokens or None, "stop_token_ids": list(message.stop_token_ids) or None,
              "logprobs": message.logprobs if message.HasField("logprobs") else None,
              "cache_salt": message.cache_salt if message.HasField("cache_salt") else None}
    if message.HasField("structured_outputs"):
        so = message.structured_outputs
        fields["structured_outputs"] = {k: getattr(so, k) for k in ("json", "regex", "grammar") if so.HasField(k)}
        if so.choice:
            fields["structured_outputs"]["choice"] = list(so.choice)
    if mode == "prefix":
        fields.update(max_stages=message.prefix.max_stages)
    elif mode == "stage":
        fields.update(stage=message.stage.stage)
    elif mode == "composition":
        fields.update(stages=list(message.composition.stages),
                      stage_weights=list(message.composition.stage_weights) or None)
    elif mode == "wand":
        fields.update(safety=message.wand.safety if message.wand.HasField("safety") else None,
                      p99_bounds=list(message.wand.p99_bounds) or None)
    elif mode == "speculative":
        fields.update(draft_stage=message.speculative.draft_stage, k_draft=message.speculative.k_draft or None)
    c = message.controls
    fields.update(repetition_penalty=c.repetition_penalty if c.HasField("repetition_penalty") else None,
                  presence_penalty=c.presence_penalty or None, frequency_penalty=c.frequency_penalty or None,
                  logit_bias={str(k): v for k, v in c.logit_bias.items()} or None, min_tokens=c.min_tokens or None)
    if message.HasField("sampling") and s.temperature:
        fields.update(temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p or None,
                      seed=s.seed if s.HasField("seed") else None, min_p=s.min_p or None)
    elif mode not in GREEDY_ONLY:
        fields.update(temperature=0)
    poe_mode = {} if mode in (None, "full") else {"poe_mode": mode}
    return {"model": MODEL, **poe_mode, **{k: v for k, v in fields.items() if v is not None}}


# every gRPC case with an HTTP form (raw bytes have none: a JSON body is text, see malformed JSON below)
FROM_GRPC = [(f"grpc: {case}", http_body(message), GRPC_TO_HTTP_FIELD.get(field, field))
             for case, message, field in BAD_GENERATE if isinstance(message, pb.GenerateRequest)]


def body(**fields) -> dict:
    return {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2, **fields}


HTTP_ONLY = [
    ("malformed JSON", b'{"model": "tiny", "prompt": [1, 2', None),
    ("a JSON array, not an object", b"[1, 2]", None),
    ("model missing", {"prompt": "x"}, "model"),
    ("prompt missing", {"model": MODEL}, "prompt"),
    ("prompt a number", body(prompt=7), "prompt"),
    ("prompt true", body(prompt=True), "prompt"),
    ("prompt mixing ids and text", body(prompt=[1, "a"]), "prompt"),
    ("prompt an empty list", body(prompt=[]), "prompt"),
    ("prompt with an empty row", body(prompt=[[1, 2], []]), "prompt"),
    ("prompt token id negative", body(prompt=[1, -1]), "prompt"),
    ("prompt token id a float", body(prompt=[1, 2.0]), "prompt"),
    ("max_tokens a string", body(max_tokens="5"), "max_tokens"),
    ("max_tokens negative", body(max_tokens=-1), "max_tokens"),
    ("max_tokens a float", body(max_tokens=2.5), "max_tokens"),
    ("n zero", body(n=0), "n"),
    ("n a float", body(n=1.5), "n"),
    ("n times prompts beyond the queue", body(n=10_000), "n"),
    ("temperature a string", body(temperature="hot"), "temperature"),
    ("top_k zero", body(temperature=1.0, top_k=0), "top_k"),
    ("seed a float", body(temperature=1.0, seed=1.5), "seed"),
    ("stream a string", body(stream="yes"), "stream"),
    ("stream_options without stream", body(stream_options={"include_usage": True}), "stream_options"),
    ("stream_options unknown key", body(stream=True, stream_options={"usage": True}), "stream_options"),
    ("logprobs above the limit", body(logprobs=MAX_LOGPROBS + 1), "logprobs"),
    ("logprobs true", body(logprobs=True), "logprobs"),
    ("echo a number", body(echo=1), "echo"),
    ("stop a number", body(stop=5), "stop"),
    ("stop an empty string", body(stop=["ok", ""]), "stop"),
    ("stop_token_ids a string", body(stop_token_ids="1,2"), "stop_token_ids"),
    ("stop_token_ids negative", body(stop_token_ids=[-3]), "stop_token_ids"),
    ("unknown field", body(max_new_tokens=5), "max_new_tokens"),
    ("unknown poe_mode", body(poe_mode="fastest"), "poe_mode"),
    ("poe_mode a number", body(poe_mode=1), "poe_mode"),
    ("a mode field with another mode", body(poe_mode="wand", stage=1), "stage"),
    ("a mode field without a mode", body(k_draft=2), "k_draft"),
    ("stage mode without its stage", body(poe_mode="stage"), "stage"),
    ("prefix mode without max_stages", body(poe_mode="prefix"), "max_stages"),
    ("composition without stages", body(poe_mode="composition"), "stages"),
    ("stages a string", body(poe_mode="composition", stages="0,1"), "stages"),
    ("stage_weights strings", body(poe_mode="composition", stages=[0, 1], stage_weights=["1", "1"]), "stage_weights"),
    ("p99_bounds a number", body(poe_mode="wand", p99_bounds=0.5), "p99_bounds"),
    ("k_draft zero", body(poe_mode="speculative", k_draft=0), "k_draft"),
    ("best_of above one", body(best_of=3), "best_of"),
    ("logit_bias key not a token id", body(logit_bias={"five": 10.0}), "logit_bias"),
    ("min_tokens a float", body(min_tokens=1.5), "min_tokens"),
    ("min_tokens above max_tokens", body(min_tokens=3), "min_tokens"),
    ("suffix set", body(suffix="end"), "suffix"),
    ("response_format json_schema invalid", body(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objectx"}}}), "response_format"),
    ("response_format json_schema without it", body(response_format={"type": "json_schema"}), "response_format"),
    ("response_format unknown type", body(response_format={"type": "yaml"}), "response_format"),
    ("structured_outputs choice empty", body(structured_outputs={"choice": []}), "structured_outputs"),
    ("structured_outputs unknown kind", body(structured_outputs={"xml": "a"}), "structured_outputs"),
    ("cache_salt a number", body(cache_salt=7), "cache_salt"),
    ("response_format and structured_outputs", body(response_format={"type": "json_object"},
                                                    structured_outputs={"regex": "a+"}), "response_format"),
]
BAD = FROM_GRPC + HTTP_ONLY


@pytest.mark.parametrize("payload, field", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_400_naming_the_field_and_the_server_keeps_serving(served, client, reference, payload, field):
    status, reply = call(served.url, "/v1/completions", payload)
    assert status == 400, reply
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == field, error
    assert field is None or names(field, error["message"]), f"{field!r} not named in: {error['message']}"
    assert kv_in_use(served.model) == 0
    assert_still_serving(client, reference)


def test_bad_input_through_the_openai_client_is_bad_request_error(served, client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0.5,
                                  extra_body={"poe_mode": "wand"})
    assert err.value.body["param"] == "temperature" and "greedy" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x", max_tokens=2)
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    assert call(served.url, "/v1/nothing")[0] == 404


# ---- overload, disconnects, auth and TLS --------------------------------------------------------
@pytest.fixture(scope="module")
def one_sequence(tiny_dir, tokenizer):
    """A server whose KV holds one sequence and whose queue holds one more."""
    model = PoEModel.from_pretrained(tiny_dir, kv_cache_tokens=SEQ_LEN)
    http = HttpServer(model, tokenizer, port=0, model_name=MODEL)
    model.loop.max_queue = 1
    yield model, http
    http.stop()


def test_a_full_queue_is_429(one_sequence):
    model, http = one_sequence
    long = GenerationRequest(tuple(prompt_ids(1, 8)), SEQ_LEN - 8, full_mode(model.config))
    running = model.loop.submit(long)
    wait_for(lambda: len(model.engine.running) == 1)
    queued = model.loop.submit(long)
    wait_for(lambda: len(model.engine.waiting) == 1)
    try:
        client = openai.OpenAI(base_url=f"{http.url}/v1", api_key="unused", max_retries=0)
        with client, pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert err.value.status_code == 429 and err.value.body["code"] == "queue_full"
    finally:
        model.loop.abort(queued)
        model.loop.abort(running)
    wait_until_kv_free(model)


def test_a_client_that_goes_away_has_its_sequence_aborted(served):
    """Streamed or whole, a request whose client disconnects ends at once (finished_reason=abort)
    and its KV is freed, long before its 230 tokens would be done."""
    aborted = ("poe:request_success_total", (("finished_reason", "abort"),))
    body_bytes = json.dumps(body(prompt=prompt_ids(40), max_tokens=SEQ_LEN - 20, temperature=0, stream=True)).encode()
    before = scrape(served.url).get(aborted, 0)
    stream = urllib.request.urlopen(urllib.request.Request(
        served.url + "/v1/completions", body_bytes, {"Content-Type": "application/json"}), timeout=60)
    assert stream.readline().startswith(b"data: ")  # the first tokens came
    stream.close()
    wait_for(lambda: scrape(served.url).get(aborted, 0) == before + 1)
    wait_until_kv_free(served.model)

    host, port = served.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    whole = json.dumps(body(prompt=prompt_ids(41), max_tokens=SEQ_LEN - 20, temperature=0)).encode()
    conn.request("POST", "/v1/completions", whole, {"Content-Type": "application/json"})
    wait_for(lambda: len(served.model.engine.running) == 1)
    conn.close()
    wait_for(lambda: scrape(served.url).get(aborted, 0) == before + 2)
    wait_until_kv_free(served.model)


def test_bearer_token_and_tls(tiny_dir, tokenizer, certs):
    security = ServerSecurity(TOKEN, str(certs / "server.pem"), str(certs / "server.key"))
    model = PoEModel.from_pretrained(tiny_dir)
    http = HttpServer(model, tokenizer, port=0, model_name=MODEL, security=security)
    try:
        assert http.url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(certs / "ca.pem"))

        def client(key: str):
            return openai.OpenAI(base_url=f"{http.url}/v1", api_key=key, max_retries=0,
                                 http_client=openai.DefaultHttpxClient(verify=trust))

        with client("wrong-token") as wrong, pytest.raises(openai.AuthenticationError) as err:
            wrong.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert err.value.body["code"] == "invalid_api_key"
        for path in ("/metrics", "/v1/models"):  # no token at all
            status, reply = call(http.url, path, context=trust)
            assert status == 401 and "missing" in reply["error"]["message"]
        for path, answer in (("/health", "ok"), ("/ready", "ready")):  # probes: a kubelet has no token
            assert call(http.url, path, context=trust) == (200, {"status": answer})
        assert call(http.url, "/v1/completions", b"{not json", context=trust)[0] == 401  # before the body is read
        with client(TOKEN) as right:  # closed before the server stops: TLS keep-alive would hold its shutdown
            assert right.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2
        assert call(http.url, "/health", token=TOKEN, context=trust) == (200, {"status": "ok"})
    finally:
        http.stop()


def test_mutual_tls_requires_a_client_certificate(tiny_dir, tokenizer, certs):
    security = ServerSecurity(None, str(certs / "server.pem"), str(certs / "server.key"), str(certs / "ca.pem"))
    http = serve_http(PoEModel.from_pretrained(tiny_dir), tokenizer, "127.0.0.1", 0, None, security, MODEL)
    try:
        anonymous = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            call(http.url, "/health", context=anonymous)
        known = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        known.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
        assert call(http.url, "/health", context=known) == (200, {"status": "ok"})
    finally:
        http.stop()


def test_the_same_front_serves_a_ray_cluster(ray_session, tiny_dir, tokenizer, reference):
    from coordinator import PoEModel

    with PoEModel.on_ray(tiny_dir) as cluster:
        http = HttpServer(cluster, tokenizer, port=0, model_name=MODEL)
        ids = prompt_ids(seed=50)
        try:
            with openai.OpenAI(base_url=f"{http.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
                for mode in ("full", "speculative"):
                    chunks = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, stream=True,
                                                       extra_body={**mode_fields(mode), "return_token_ids": True})
                    assert [t for c in chunks for t in c.choices[0].token_ids] == new_tokens(reference, mode, ids, 8)
            assert call(http.url, "/ready") == (200, {"status": "ready"})
        finally:
            http.stop()


def test_serve_flags_choose_what_http_serves(tiny_dir, tokenizer):
    from tools.cli import build_parser

    args = build_parser().parse_args(["serve", "--http-port", "0", "--served-model-name", "m"])
    assert (args.http_port, args.metrics_port, args.served_model_name) == (0, None, "m")
    assert serve_http(None, tokenizer, "127.0.0.1", None, None, ServerSecurity(), MODEL) is None
    metrics_only = serve_http(PoEModel.from_pretrained(tiny_dir), tokenizer, "127.0.0.1", None, 0, ServerSecurity(),
                              MODEL)
    try:
        assert call(metrics_only.url, "/v1/models")[0] == 404
        with urllib.request.urlopen(metrics_only.url + "/metrics", timeout=10) as reply:
            assert reply.status == 200 and b"poe:num_requests_running" in reply.read()
    finally:
        metrics_only.stop()


def raw(url: str, path: str, data: bytes, headers: dict) -> tuple[int, dict]:
    """A POST exactly as given: no header but `headers` (and Host, Content-Length)."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    connection.request("POST", path, body=data, headers=headers)
    answer = connection.getresponse()
    return answer.status, json.loads(answer.read())


def test_a_careless_client_is_told_what_to_send(served, client, reference):
    payload = json.dumps(body()).encode()
    status, reply = raw(served.url, "/v1/completions", payload, {})
    assert status == 400 and "no Content-Type" in reply["error"]["message"], reply
    assert "'Content-Type: application/json'" in reply["error"]["message"]
    status, reply = raw(served.url, "/v1/completions", b'{"model": "\xff\xfe"}', {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in reply["error"]["message"] and "UTF-8" in reply["error"]["message"]
    status, reply = call(served.url, "/v1/chat/completions", {"model": MODEL, "messages": []})
    assert status == 404 and reply["error"]["code"] == "chat_not_supported", reply
    assert "base model" in reply["error"]["message"] and "/v1/completions" in reply["error"]["message"]
    assert_still_serving(client, reference)


def test_a_body_over_max_request_bytes_is_413_before_it_is_parsed(tiny_dir, tokenizer):
    with PoEModel.from_pretrained(tiny_dir) as model:
        server = HttpServer(model, tokenizer, port=0, model_name=MODEL, max_request_bytes=2_000)
        try:
            status, reply = call(server.url, "/v1/completions", body(prompt="x" * 5_000))
            assert status == 413 and reply["error"]["code"] == "request_too_large", reply
            assert "at most 2,000" in reply["error"]["message"] and "max_request_bytes" in reply["error"]["message"]
            connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
            connection.putrequest("POST", "/v1/completions")  # chunked, no Content-Length: counted as it comes
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Transfer-Encoding", "chunked")
            connection.endheaders()
            for chunk in [json.dumps(body(prompt="y" * 3_000)).encode()]:
                connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            connection.send(b"0\r\n\r\n")
            answer = connection.getresponse()
            assert answer.status == 413 and b"request_too_large" in answer.read()
            assert call(server.url, "/v1/completions", body())[0] == 200, "a small body still serves"
        finally:
            server.stop()
