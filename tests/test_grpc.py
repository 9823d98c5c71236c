"""The gRPC front end to end: every mode, streaming and scoring through a real channel.

The server runs over one model (in-process, and on the session's Ray instance); a separate
in-process `PoEModel` on the same checkpoint is the reference. Tokens must be identical,
scores within 1e-4, and concurrent calls must each get the tokens they get alone.
"""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import BOUNDS, CONTROLS, MODES, new_tokens, prompt_ids, stage_infos

from coordinator import PoEModel, load_tokenizer
from coordinator.grpc_api.server import SERVICE_NAME, Server
from protos import poe_serving_pb2 as pb
from tools.client import PoEClient, build_request


@pytest.fixture(scope="module", params=["local", "ray"])
def client(request, tiny_dir):
    """A client connected to a fresh server on a free loopback port."""
    if request.param == "local":
        model = PoEModel.from_pretrained(tiny_dir)
        server = Server(model, load_tokenizer(tiny_dir), port=0)
        yield PoEClient(server.address, timeout=120)
        server.stop()
        return
    request.getfixturevalue("ray_session")
    with PoEModel.on_ray(tiny_dir) as cluster:
        server = Server(cluster, load_tokenizer(tiny_dir), port=0)
        yield PoEClient(server.address, timeout=120)
        server.stop()


@pytest.mark.parametrize("mode", list(MODES))
def test_generate_matches_the_in_process_model(client, reference, tokenizer, mode):
    ids = prompt_ids(seed=len(mode), length=30)
    response = client.generate(token_ids=ids, max_new_tokens=9, **MODES[mode][0])
    assert list(response.token_ids) == new_tokens(reference, mode, ids, 9)
    assert response.finish_reason == "length" and response.prompt_tokens == len(ids)
    assert response.text == tokenizer.decode(list(response.token_ids))
    if mode == "wand":
        _, used = reference.generate_wand(torch.tensor([ids]), 9, 1.0, BOUNDS, return_stages_used=True)
        assert list(response.stages_used) == used[0].tolist()
    if mode == "speculative":
        _, rate = reference.generate_speculative(torch.tensor([ids]), 0, 3, 9, return_acceptance=True)
        assert response.acceptance_rate == pytest.approx(rate)


def test_a_repeated_prompt_reports_cached_tokens_and_salts_keep_tenants_apart(client, reference):
    ids = prompt_ids(seed=91, length=40)  # two full KV blocks of 16, then 8 positions
    want = new_tokens(reference, "full", ids, 4)
    for salt, cached in [("a", 0), ("a", 32), ("b", 0)]:
        response = client.generate(token_ids=ids, max_new_tokens=4, cache_salt=salt)
        assert list(response.token_ids) == want and response.cached_tokens == cached
    chunks = list(client.stream(token_ids=ids, max_new_tokens=4, cache_salt="b"))
    assert [t for c in chunks for t in c.token_ids] == want
    assert (chunks[-1].prompt_tokens, chunks[-1].cached_tokens) == (40, 32)


@pytest.mark.parametrize("mode", list(MODES))
def test_decoding_controls_give_the_in_process_models_tokens(client, reference, mode):
    ids = prompt_ids(seed=50, length=8) * 3  # repeats, where the penalties bite
    response = client.generate(token_ids=ids, max_new_tokens=9, min_tokens=4, **CONTROLS, **MODES[mode][0])
    assert list(response.token_ids) == new_tokens(reference, mode, ids, 9, min_tokens=4, **CONTROLS)
    if mode == "full":
        assert list(response.token_ids) != new_tokens(reference, mode, ids, 9), "the controls changed the tokens"


@pytest.mark.parametrize("mode", ["full", "wand", "speculative"])
def test_logprobs_come_with_each_token_whole_and_streamed(client, mode):
    ids = prompt_ids(seed=54, length=20)
    whole = client.generate(token_ids=ids, max_new_tokens=8, logprobs=2, **MODES[mode][0])
    chunks = list(client.stream(token_ids=ids, max_new_tokens=8, logprobs=2, **MODES[mode][0]))
    streamed = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in whole.logprobs] == list(whole.token_ids) == [lp.token_id for lp in streamed]
    assert [lp.logprob for lp in streamed] == pytest.approx([lp.logprob for lp in whole.logprobs], abs=1e-5)
    assert all(len(lp.top) == 2 and lp.top[0].logprob >= lp.logprob - 1e-5 for lp in whole.logprobs)
    if mode == "full":  # greedy: each token is its position's most likely, scored as Score scores it
        scores = list(client.score(token_ids=ids + list(whole.token_ids)).token_logprobs)
        assert [lp.logprob for lp in whole.logprobs] == pytest.approx(scores[len(ids) - 1 :], abs=1e-5)
        assert all(lp.top[0].token_id == lp.token_id for lp in whole.logprobs)
    assert not client.generate(token_ids=ids, max_new_tokens=2, **MODES[mode][0]).logprobs, "only when asked"


def test_structured_output_gives_the_in_process_models_tokens(client, reference):
    ids = prompt_ids(seed=56, length=12)
    for given in ({"choice": ["left", "right"]}, {"json": {"type": "object"}}, {"regex": "[0-9]{2}"}):
        reply = client.generate(token_ids=ids, max_new_tokens=24, structured_outputs=given)
        assert list(reply.token_ids) == new_tokens(reference, "full", ids, 24, structured_outputs=given)
    reply = client.generate(token_ids=ids, max_new_tokens=24, structured_outputs={"choice": ["left", "right"]})
    assert reply.text in ("left", "right") and reply.finish_reason == "stop"


def test_prompt_text_gets_bos_and_stop_tokens_stop(client, reference, tokenizer):
    tok = tokenizer
    text = "def add(a, b):\n    return a + b\n"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    free = client.generate(prompt=text, max_new_tokens=8)
    assert list(free.token_ids) == new_tokens(reference, "full", ids, 8)
    stop = free.token_ids[3]
    stopped = client.generate(prompt=text, max_new_tokens=8, stop_token_ids=[stop])
    first = list(free.token_ids).index(stop)
    assert list(stopped.token_ids) == list(free.token_ids)[: first + 1] and stopped.finish_reason == "stop"


@pytest.mark.parametrize("mode", ["full", "wand", "speculative"])
def test_stream_yields_the_same_tokens_and_text(client, mode):
    ids = prompt_ids(seed=40, length=30)
    whole = client.generate(token_ids=ids, max_new_tokens=10, **MODES[mode][0])
    chunks = list(client.stream(token_ids=ids, max_new_tokens=10, **MODES[mode][0]))
    assert len(chunks) >= 2, "tokens arrive as they are made, not in one chunk"
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == "length"
    if mode == "wand":
        assert [s for c in chunks for s in c.stages_used] == list(whole.stages_used)


def test_score_is_full_poe_log_probs_and_bits_per_byte(client, reference, tokenizer):
    tok = tokenizer
    ids = prompt_ids(seed=41, length=40)
    response = client.score(token_ids=ids)
    expected = reference.forward(torch.tensor([ids]))[0, :-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert len(response.token_logprobs) == len(ids) - 1
    assert torch.allclose(torch.tensor(response.token_logprobs, dtype=torch.float64), expected.double(), atol=1e-4)
    text = "import os\nprint(os.getcwd())\n"
    scored = client.score(prompt=text)
    text_ids = tok.encode(text)
    nbytes = sum(len(tok.encoding.decode_single_token_bytes(t)) for t in text_ids[1:])
    assert scored.bits_per_byte == pytest.approx(-sum(scored.token_logprobs) / torch.log(torch.tensor(2.0)).item() / nbytes)


def test_model_info_health_and_reflection(client, reference):
    info = client.model_info()
    c = reference.config
    assert list(info.stage_layout) == list(c.poe_stage_layout)
    assert list(info.boundary_layers) == list(c.stage_boundaries)
    assert info.vocab_size == c.vocab_size and info.context_length == c.sequence_len
    assert info.parameter_count == c.num_parameters()
    assert [w.stage for w in info.workers] == list(range(c.num_stages))
    held = stage_infos(reference)
    assert [(w.first_layer, w.last_layer, w.parameters) for w in info.workers] == \
        [(*h.layers, h.num_parameters) for h in held]
    assert all(w.parameters < c.num_parameters() for w in info.workers), "a worker holds only its slice"
    assert client.health() == "SERVING"
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(replies).list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_sixteen_concurrent_calls_each_get_their_own_tokens(client, reference):
    modes = list(MODES)
    jobs = [(i, modes[i % len(modes)], prompt_ids(seed=100 + i, length=20 + i)) for i in range(16)]
    results: dict[int, object] = {}

    def call(i, mode, ids):
        try:
            results[i] = list(client.generate(token_ids=ids, max_new_tokens=8, **MODES[mode][0]).token_ids)
        except grpc.RpcError as exc:  # recorded, so the assertion below names it
            results[i] = exc

    threads = [threading.Thread(target=call, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i, mode, ids in jobs:
        assert results.get(i) == new_tokens(reference, mode, ids, 8), f"request {i} ({mode})"


@pytest.mark.parametrize("kwargs, field", [
    (dict(mode="stage", stage=9), "stage"),
    (dict(mode="prefix", max_stages=0), "max_stages"),
    (dict(mode="composition", stages=[0, 0]), "stages"),
    (dict(mode="composition", stages=[0, 1], stage_weights=[1.0, float("nan")]), "stage_weights"),
    (dict(mode="speculative", k_draft=10_000), "k_draft"),
    (dict(token_ids=[10**6]), "token_ids"),
    (dict(token_ids=[1, 2], max_new_tokens=10**6), "max_new_tokens"),
])
def test_bad_arguments_are_invalid_argument_and_the_server_keeps_serving(client, reference, kwargs, field):
    kwargs = {"token_ids": [1, 2, 3], **kwargs}
    with pytest.raises(grpc.RpcError) as err:
        client.generate(**kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    ids = prompt_ids(seed=5, length=30)
    assert list(client.generate(token_ids=ids, max_new_tokens=3).token_ids) == new_tokens(reference, "full", ids, 3)


def test_request_builder_rejects_unknown_modes():
    with pytest.raises(ValueError, match="mode='fast'"):
        build_request(token_ids=[1], mode="fast")
    assert isinstance(build_request(token_ids=[1]), pb.GenerateRequest)


def test_health_reports_not_serving_after_stop(tiny_dir):
    server = Server(PoEModel.from_pretrained(tiny_dir), load_tokenizer(tiny_dir), port=0)
    client = PoEClient(server.address, timeout=10)
    assert client.health() == "SERVING"
    server.stop(grace=0.5)
    with pytest.raises(grpc.RpcError) as err:
        client.health()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
