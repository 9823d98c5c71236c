"""Reliability of the gRPC server: bad input, random requests, disconnects, overload and a soak.

Everything goes through a real server on a loopback port, over the in-process model (and Ray
for disconnects). A reply is either exactly the tokens the request gets alone (a separate
in-process `PoEModel` is the reference) or a clean status: INVALID_ARGUMENT naming the field,
RESOURCE_EXHAUSTED under overload. After clients go away every worker's KV is back to its
baseline, and the server keeps serving. The figures are printed (run with -s to see them).
"""

from __future__ import annotations

import itertools
import math
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    BAD_GENERATE,
    BOUNDS,
    INF,
    MODES,
    NAN,
    NUM_STAGES,
    SEQ_LEN,
    VOCAB,
    edited,
    gen,
    kv_in_use,
    new_tokens,
    non_utf8_prompt,
    prompt_ids,
    wait_until_kv_free,
)

from coordinator import PoEModel
from coordinator.core.requests import MAX_K_DRAFT
from coordinator.grpc_api import wire
from coordinator.grpc_api.server import SERVICE_NAME, TRANSPORT_LIMIT, Server
from coordinator.serving_config import DEFAULT_MAX_REQUEST_BYTES as MAX_MESSAGE_BYTES
from protos import poe_serving_pb2 as pb
from tools.client import PoEClient, build_request


class Expected:
    """Reference new tokens from a separate in-process model, computed once per (mode, prompt, n)."""

    def __init__(self, model: PoEModel):
        self.model, self.cache, self.lock = model, {}, threading.Lock()

    def __call__(self, mode: str, ids: list[int], n: int) -> list[int]:
        key = (mode, tuple(ids), n)
        with self.lock:
            if key not in self.cache:
                self.cache[key] = new_tokens(self.model, mode, ids, n)
            return self.cache[key]


@dataclass
class Served:
    model: PoEModel
    server: Server
    client: PoEClient


@pytest.fixture(scope="module")
def expected(reference):
    c = reference.config
    assert (c.vocab_size, c.sequence_len, c.num_stages) == (VOCAB, SEQ_LEN, NUM_STAGES), "support.py's constants: out of date"
    return Expected(reference)


def serve(model: PoEModel, tokenizer, **kwargs) -> Served:
    server = Server(model, tokenizer, port=0, **kwargs)
    assert kv_in_use(model) == 0, "a fresh server holds no KV"
    return Served(model, server, PoEClient(server.address, timeout=60))


@pytest.fixture(scope="module")
def served(tiny_dir, tokenizer):
    s = serve(PoEModel.from_pretrained(tiny_dir), tokenizer)
    yield s
    s.client.close()
    s.server.stop(0)


# ---- helpers -------------------------------------------------------------------------------
def call_raw(client: PoEClient, method: str, data: bytes, timeout: float = 60):
    """Send serialized bytes as they are (no client-side serialization) and return the raw reply."""
    path = f"/{SERVICE_NAME}/{method}"
    if method == "GenerateStream":
        stream = client.channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        return list(stream(data, timeout=timeout))
    unary = client.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    return unary(data, timeout=timeout)


def names(field: str, details: str) -> bool:
    return re.search(rf"\b{re.escape(field)}\b", details) is not None


def assert_still_serving(served: Served, expected: Expected) -> None:
    assert served.client.health() == "SERVING"
    ids = prompt_ids(seed=5)
    assert list(served.client.generate(token_ids=ids, max_new_tokens=3).token_ids) == expected("full", ids, 3)


# ---- 1. bad input matrix -------------------------------------------------------------------
# support.py's bad Generate requests (shared with the HTTP suite), and the other RPCs'
BAD_INPUTS = [(case, "Generate", payload, field) for case, payload, field in BAD_GENERATE] + [
    ("stream: stage out of range", "GenerateStream", gen(mode="stage", stage=NUM_STAGES), "stage"),
    ("stream: prompt not UTF-8", "GenerateStream", non_utf8_prompt(gen(token_ids=None, prompt="AB")), "prompt"),
    ("score: one token", "Score", pb.ScoreRequest(token_ids=pb.TokenIds(ids=[5])), "input"),
    ("score: token_ids empty", "Score", edited(pb.ScoreRequest(), lambda m: m.token_ids.SetInParent()), "token_ids"),
    ("score: token id equal to the vocab size", "Score", pb.ScoreRequest(token_ids=pb.TokenIds(ids=[1, VOCAB])),
     "token_ids"),
    ("score: prompt not UTF-8", "Score", non_utf8_prompt(pb.ScoreRequest(prompt="AB")), "prompt"),
]


@pytest.mark.parametrize("rpc, payload, field", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_invalid_argument_naming_the_field_and_the_server_keeps_serving(served, expected, rpc, payload,
                                                                                   field):
    data = payload if isinstance(payload, bytes) else payload.SerializeToString()
    with pytest.raises(grpc.RpcError) as err:
        call_raw(served.client, rpc, data)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert names(field, err.value.details()), f"{field!r} not named in: {err.value.details()}"
    assert_still_serving(served, expected)


def test_zero_values_mean_the_documented_defaults(served, expected, reference):
    """proto3 cannot tell 0 from unset: k_draft 0 is 3, max_new_tokens 0 is 16, temperature 0 is
    greedy and top_p 0 or 1 is no top-p. None of them is an error. WAND's safety has presence:
    unset is 1.0, and an explicit 0 is 0 (exit at the first stage whose margin is positive)."""
    ids, c = prompt_ids(seed=11), served.client
    default_length = expected("full", ids, wire.DEFAULT_MAX_NEW_TOKENS)
    assert list(c.generate(token_ids=ids, max_new_tokens=0).token_ids) == default_length
    assert list(c.generate(token_ids=ids, max_new_tokens=5, mode="speculative", k_draft=0).token_ids) == \
        expected("speculative", ids, 5)
    unset_safety = edited(gen(token_ids=ids, max_new_tokens=5, mode="wand", p99_bounds=BOUNDS),
                          lambda m: m.wand.ClearField("safety"))
    assert list(c.stub.Generate(unset_safety, timeout=60).token_ids) == expected("wand", ids, 5)
    zero_safety = c.generate(token_ids=ids, max_new_tokens=5, mode="wand", safety=0.0, p99_bounds=BOUNDS)
    wand_zero, used = reference.generate_wand(torch.tensor([ids]), 5, 0.0, BOUNDS, return_stages_used=True)
    assert list(zero_safety.token_ids) == wand_zero[0, len(ids):].tolist()
    assert list(zero_safety.stages_used) == used[0].tolist()
    zero_temperature = edited(gen(token_ids=ids, max_new_tokens=5), lambda m: m.sampling.SetInParent())
    assert list(c.stub.Generate(zero_temperature, timeout=60).token_ids) == expected("full", ids, 5)
    for top_p in (0.0, 1.0):
        sampled = c.generate(token_ids=ids, max_new_tokens=5, temperature=0.8, top_k=50, top_p=top_p, seed=7)
        assert list(sampled.token_ids) == reference.generate(torch.tensor([ids]), 5, do_sample=True, temperature=0.8,
                                                             top_k=50, seed=7)[0, len(ids):].tolist()


def test_an_oversize_message_is_invalid_argument_naming_its_largest_field(served, expected):
    """Over max_request_bytes (4 MiB by default) the server refuses the request before parsing it, naming the
    field that made it large; only past gRPC's transport limit is it RESOURCE_EXHAUSTED, from
    gRPC itself. Just under the limit the message is parsed and refused by validation."""
    for field, message in [("prompt", gen(token_ids=None, prompt="x" * (MAX_MESSAGE_BYTES + 1))),
                           ("token_ids", gen(token_ids=[200] * (MAX_MESSAGE_BYTES // 2 + 1)))]:  # 2-byte varints
        with pytest.raises(grpc.RpcError) as err:
            call_raw(served.client, "Generate", message.SerializeToString())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and names(field, err.value.details())
        assert f"at most {MAX_MESSAGE_BYTES:,}" in err.value.details()
    beyond = gen(token_ids=None, prompt="x" * (TRANSPORT_LIMIT * MAX_MESSAGE_BYTES + 1)).SerializeToString()
    with pytest.raises(grpc.RpcError) as err:
        call_raw(served.client, "Generate", beyond)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.value.details()
    under = gen(token_ids=None, prompt=" x" * ((MAX_MESSAGE_BYTES - 64) // 2)).SerializeToString()
    assert len(under) <= MAX_MESSAGE_BYTES
    with pytest.raises(grpc.RpcError) as err:
        call_raw(served.client, "Generate", under)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and names("prompt", err.value.details())
    assert_still_serving(served, expected)


# ---- 2. random requests --------------------------------------------------------------------
WEIGHTS = st.one_of(st.floats(0.01, 100), st.sampled_from([0.0, -1.0, NAN, INF, -INF, 1e-310, 1e300]))
BOUND_VALUES = st.one_of(st.floats(0, 5), st.sampled_from([INF, -0.5, NAN]))
BAD_SAFETY = st.sampled_from([-1.0, -1e-9, NAN, INF, -INF])
BAD_TEMPERATURE = st.sampled_from([-0.5, NAN, INF, 1e-300])
BAD_TOP_P = st.sampled_from([1.5, -0.2, NAN, INF])


def _draw_input(draw, msg: pb.GenerateRequest, bad: set, breaking: bool) -> None:
    kind = draw(st.sampled_from(["none", "empty", "out_of_vocab", "too_long"] if breaking else ["ids", "prompt"]))
    if kind == "ids":
        msg.token_ids.ids.extend(draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40)))
    elif kind == "prompt":
        msg.prompt = draw(st.text(max_size=40))
    elif kind == "none":
        bad.add("input")
    elif kind == "empty":
        msg.token_ids.SetInParent()
        bad.add("token_ids")
    elif kind == "out_of_vocab":
        ids = draw(st.lists(st.integers(0, VOCAB - 1), max_size=10))
        msg.token_ids.ids.extend([*ids, draw(st.integers(VOCAB, 2**32 - 1))])
        bad.add("token_ids")
    else:
        msg.token_ids.ids.extend([draw(st.integers(0, VOCAB - 1))] * draw(st.integers(SEQ_LEN + 1, SEQ_LEN + 50)))
        bad.add("token_ids")


def _draw_mode(draw, msg: pb.GenerateRequest, bad: set, breaking: bool) -> str:
    """Sets a mode; when `breaking`, with at least one bad value (recorded in `bad`)."""
    mode = draw(st.sampled_from(["prefix", "stage", "composition", "wand", "speculative"] if breaking else
                                ["unset", "full", "prefix", "stage", "composition", "wand", "speculative"]))
    pick = (lambda ok, wrong: draw(wrong if breaking else ok))
    if mode == "full":
        msg.full.SetInParent()
    elif mode == "prefix":
        msg.prefix.SetInParent()
        msg.prefix.max_stages = m = pick(st.integers(1, NUM_STAGES), st.sampled_from([0, NUM_STAGES + 1, 2**32 - 1]))
        bad.update([] if 1 <= m <= NUM_STAGES else ["max_stages"])
    elif mode == "stage":
        msg.stage.SetInParent()
        msg.stage.stage = k = pick(st.integers(0, NUM_STAGES - 1), st.integers(NUM_STAGES, 2**32 - 1))
        bad.update([] if k < NUM_STAGES else ["stage"])
    elif mode == "composition":
        stages = draw(st.lists(st.integers(0, NUM_STAGES + 1 if breaking else NUM_STAGES - 1), max_size=NUM_STAGES + 1,
                               min_size=0 if breaking else 1, unique=not breaking))
        weights = draw(st.one_of(st.just([]), st.lists(WEIGHTS if breaking else st.floats(0.01, 100),
                                                       min_size=len(stages), max_size=len(stages)),
                                 *([st.lists(WEIGHTS, max_size=NUM_STAGES + 1)] if breaking else [])))
        msg.composition.SetInParent()
        msg.composition.stages.extend(stages)
        msg.composition.stage_weights.extend(weights)
        if not stages or max(stages) >= NUM_STAGES or len(set(stages)) != len(stages):
            bad.add("stages")
        if weights and (len(weights) != len(stages) or not all(1e-30 <= w <= 1e30 for w in weights)):
            bad.add("stage_weights")
    elif mode == "wand":
        msg.wand.SetInParent()
        msg.wand.safety = safety = pick(st.floats(0, 10), st.one_of(st.floats(0, 10), BAD_SAFETY))
        good_bounds = st.lists(st.one_of(st.floats(0, 5), st.just(INF)), min_size=NUM_STAGES, max_size=NUM_STAGES)
        bounds = pick(st.one_of(st.just([]), good_bounds), st.lists(BOUND_VALUES, max_size=2 * NUM_STAGES))
        msg.wand.p99_bounds.extend(bounds)
        bad.update([] if math.isfinite(safety) and safety >= 0 else ["safety"])
        if bounds and (len(bounds) != NUM_STAGES or not all(b >= 0 for b in bounds)):  # NaN >= 0 is False
            bad.add("p99_bounds")
    elif mode == "speculative":
        msg.speculative.SetInParent()
        msg.speculative.draft_stage = d = pick(st.integers(0, NUM_STAGES - 1), st.integers(0, 2 * NUM_STAGES))
        msg.speculative.k_draft = k = pick(st.integers(0, MAX_K_DRAFT), st.integers(0, 3 * MAX_K_DRAFT))
        bad.update(([] if d < NUM_STAGES else ["draft_stage"]) + ([] if k <= MAX_K_DRAFT else ["k_draft"]))
    return mode


def _draw_sampling(draw, msg: pb.GenerateRequest, bad: set, breaking: bool, mode: str) -> None:
    greedy_only = mode in ("wand", "speculative")  # any sampling there is an error
    kinds = ["bad_temperature", "bad_top_p"] + (["valid"] if greedy_only else []) if breaking else \
        ["none", "greedy"] + ([] if greedy_only else ["valid"])
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return
    s = msg.sampling
    s.SetInParent()
    if kind == "greedy":
        return
    s.temperature = draw(BAD_TEMPERATURE if kind == "bad_temperature" else st.floats(0.05, 3))
    s.top_k = draw(st.integers(0, VOCAB + 100))
    s.top_p = draw(BAD_TOP_P if kind == "bad_top_p" else st.one_of(st.just(0.0), st.floats(0.01, 1)))
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    if greedy_only:
        bad.add("sampling")  # checked before the values
    elif kind != "valid":
        bad.add(kind.removeprefix("bad_"))


PARTS = ("input", "max_new_tokens", "mode", "sampling", "stop_token_ids")


@st.composite
def generate_requests(draw):
    """A GenerateRequest over every field, its mode, and the fields that make it invalid: half the
    requests are valid, the others have one or two parts broken."""
    broken = draw(st.frozensets(st.sampled_from(PARTS), min_size=1, max_size=2)) if draw(st.booleans()) else frozenset()
    msg, bad = pb.GenerateRequest(), set()
    _draw_input(draw, msg, bad, "input" in broken)
    if "max_new_tokens" in broken:
        msg.max_new_tokens = draw(st.integers(SEQ_LEN, 2**32 - 1))
        bad.add("max_new_tokens")
    else:
        msg.max_new_tokens = draw(st.integers(1, 6))
    mode = _draw_mode(draw, msg, bad, "mode" in broken)
    _draw_sampling(draw, msg, bad, "sampling" in broken, mode)
    stops = draw(st.lists(st.integers(0, VOCAB - 1), max_size=3))
    if "stop_token_ids" in broken:
        stops.insert(draw(st.integers(0, len(stops))), draw(st.integers(VOCAB, 2**32 - 1)))
        bad.add("stop_token_ids")
    msg.stop_token_ids.extend(stops)
    return msg, mode, frozenset(bad)


class Canary(threading.Thread):
    """Streams fixed requests over and over while other traffic runs; counts runs whose tokens
    differ from the reference model's."""

    MODES = ("full", "sampled", "speculative", "wand")

    def __init__(self, address: str, expected: Expected, n: int = 10):
        super().__init__(daemon=True)
        self.address, self.n = address, n
        self.ids = prompt_ids(seed=77, length=24)
        self.want = {mode: expected(mode, self.ids, n) for mode in self.MODES}
        self.stopped, self.runs, self.wrong, self.errors = threading.Event(), 0, 0, []

    def run(self) -> None:
        with PoEClient(self.address, timeout=60) as client:
            while not self.stopped.is_set():
                mode = self.MODES[self.runs % len(self.MODES)]
                try:
                    got = [t for c in client.stream(token_ids=self.ids, max_new_tokens=self.n, **MODES[mode][0])
                           for t in c.token_ids]
                except grpc.RpcError as exc:
                    self.errors.append(f"{mode}: {exc.code()} {exc.details()}")
                    continue
                self.runs += 1
                self.wrong += got != self.want[mode]

    def __enter__(self) -> "Canary":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.join(timeout=60)
        assert not self.is_alive(), "the canary hung"


def check_accepted(msg: pb.GenerateRequest, mode: str, reply: pb.GenerateResponse, run_alone) -> None:
    """An accepted request ends by length or at its first stop token, with the tokens it gets alone
    (`run_alone()`: its sequence on the reference model; unseeded sampling has no fixed tokens)."""
    got, stops = list(reply.token_ids), set(msg.stop_token_ids)
    n = msg.max_new_tokens
    assert 1 <= len(got) <= n and all(0 <= t < VOCAB for t in got)
    assert not stops & set(got[:-1]), "generation went on past a stop token"
    assert reply.finish_reason == ("stop" if got[-1] in stops else "length")
    assert reply.finish_reason == "stop" or len(got) == n
    if mode == "wand":
        assert len(reply.stages_used) == len(got) and all(0 <= s < NUM_STAGES for s in reply.stages_used)
    if not msg.HasField("sampling") or msg.sampling.temperature == 0 or msg.sampling.HasField("seed"):
        alone = run_alone()
        assert got == alone.new_tokens
        assert mode != "wand" or list(reply.stages_used) == alone.stages_used


def test_random_requests_never_crash_the_server_or_corrupt_a_concurrent_request(served, expected, reference, tokenizer):
    """Valid requests succeed with the tokens they get alone; invalid ones are INVALID_ARGUMENT naming
    one of their bad fields; a canary streaming alongside always gets its reference tokens."""
    seen = Counter()

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,  # the same 60 requests every run
              suppress_health_check=list(HealthCheck))
    @given(generate_requests())
    def check(case):
        msg, mode, bad = case
        seen["requests"] += 1
        try:
            reply = served.client.stub.Generate(msg, timeout=60)
        except grpc.RpcError as exc:
            assert served.client.health() == "SERVING"
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{exc.code()}: {exc.details()}"
            assert bad, f"a valid request was refused: {exc.details()}"
            assert any(names(f, exc.details()) for f in bad), f"none of {sorted(bad)} named in: {exc.details()}"
            seen["invalid_argument"] += 1
            return
        assert not bad, f"an invalid request ({sorted(bad)}) was accepted"
        alone = lambda: reference.run([wire.generation_request(msg, tokenizer, reference.config)])[0]  # noqa: E731
        check_accepted(msg, mode, reply, alone)
        seen["ok"] += 1

    with Canary(served.server.address, expected) as canary:
        check()
    print(f"\nrandom requests: {dict(seen)}; canary: {canary.runs} runs alongside, {canary.wrong} wrong, "
          f"{len(canary.errors)} errors")
    assert canary.errors == [] and canary.wrong == 0 and canary.runs >= 1
    assert seen["ok"] >= 5 and seen["invalid_argument"] >= 5, f"both kinds of request were tried: {dict(seen)}"
    assert served.client.health() == "SERVING"
    wait_until_kv_free(served.model)


def test_random_bytes_are_ok_or_invalid_argument_never_internal(served, expected):
    codes = Counter()

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=48))
    def check(data):
        try:
            call_raw(served.client, "Generate", data)
            codes["OK"] += 1
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{data!r}: {exc.code()} {exc.details()}"
            codes[exc.code().name] += 1

    check()
    print(f"\nrandom bytes: {dict(codes)}")
    assert_still_serving(served, expected)
    wait_until_kv_free(served.model)


# ---- 3. deadlines and cancellation ---------------------------------------------------------
LONG = 200  # new tokens: the call is cut long before they are done


def seconds_per_token(client: PoEClient) -> float:
    t0 = time.perf_counter()
    client.generate(token_ids=prompt_ids(seed=3), max_new_tokens=20)
    return (time.perf_counter() - t0) / 20


def disconnect(kind: str, client: PoEClient, model: PoEModel, per_token: float) -> tuple[grpc.StatusCode, bool]:
    """Start a long generation, go away as `kind` says; returns (status, whether its KV was seen in use)."""
    request = build_request(token_ids=prompt_ids(seed=13), max_new_tokens=LONG)
    timeout = max(0.3, 40 * per_token)  # a fifth of the generation
    if kind in ("unary deadline", "unary cancel"):
        future = client.stub.Generate.future(request, timeout=None if kind == "unary cancel" else timeout)
        seen = False
        while not future.done() and not seen:
            seen = kv_in_use(model) > 0
            time.sleep(0.002)
        if kind == "unary cancel":
            future.cancel()
            return grpc.StatusCode.CANCELLED if future.cancelled() else future.code(), seen
        return future.exception().code(), seen
    stream = client.stub.GenerateStream(request, timeout=timeout if kind == "stream deadline" else 60)
    tokens = []
    try:
        for chunk in stream:
            tokens.extend(chunk.token_ids)
            if kind == "stream cancel" and len(tokens) >= 3:
                stream.cancel()
    except grpc.RpcError as exc:
        return exc.code(), 0 < len(tokens) < LONG
    return grpc.StatusCode.OK, False


@pytest.mark.parametrize("kind, status", [
    ("unary deadline", grpc.StatusCode.DEADLINE_EXCEEDED),
    ("stream deadline", grpc.StatusCode.DEADLINE_EXCEEDED),
    ("unary cancel", grpc.StatusCode.CANCELLED),
    ("stream cancel", grpc.StatusCode.CANCELLED),
])
def test_a_client_that_leaves_mid_generation_frees_its_kv_on_every_worker(served, expected, kind, status):
    per_token = seconds_per_token(served.client)
    wait_until_kv_free(served.model)
    code, mid_generation = disconnect(kind, served.client, served.model, per_token)
    assert code == status and mid_generation, f"{kind}: {code}, mid-generation: {mid_generation}"
    released = wait_until_kv_free(served.model, timeout=5.0)
    print(f"\n{kind}: KV back to baseline {released * 1000:.0f} ms after the client left")
    assert_still_serving(served, expected)


def test_a_request_aborted_before_the_engine_took_it_still_ends(served, tokenizer):
    """A client can leave between submit and the engine loop's next drain: the abort then overtakes
    the request, and whoever waits on it (the RPC handler thread) must still be told it ended."""
    request = wire.generation_request(build_request(token_ids=prompt_ids(seed=21), max_new_tokens=50),
                                      tokenizer, served.model.config)
    for _ in range(20):
        handle = served.model.loop.submit(request)
        served.model.loop.abort(handle)
        handle.result(timeout=10)  # queue.Empty here: the handler thread would wait forever
    wait_until_kv_free(served.model)


def test_on_ray_a_client_that_leaves_mid_generation_frees_its_kv_on_every_worker(ray_session, tiny_dir, tokenizer,
                                                                                  expected):
    from coordinator import PoEModel

    with PoEModel.on_ray(tiny_dir) as cluster:
        s = serve(cluster, tokenizer)
        try:
            per_token = seconds_per_token(s.client)
            for kind, status in (("stream cancel", grpc.StatusCode.CANCELLED),
                                 ("unary deadline", grpc.StatusCode.DEADLINE_EXCEEDED)):
                code, mid_generation = disconnect(kind, s.client, cluster, per_token)
                assert code == status and mid_generation, f"{kind}: {code}, mid-generation: {mid_generation}"
                released = wait_until_kv_free(cluster, timeout=10.0)
                print(f"\nRay, {kind}: KV back to baseline {released * 1000:.0f} ms after the client left")
            assert_still_serving(s, expected)
        finally:
            s.client.close()
            s.server.stop(0)


# ---- 4. overload ---------------------------------------------------------------------------
def test_two_hundred_concurrent_requests_on_a_small_kv_budget_get_their_tokens_or_resource_exhausted(
        tiny_dir, tokenizer, expected):
    """KV for three sequences per worker and a queue of eight. Every answer is exactly the request's
    tokens or RESOURCE_EXHAUSTED (the client then retries until it gets its tokens); a few clients
    leave early on a deadline. Nothing deadlocks, and the KV ends at its baseline."""
    n, num_requests, num_deadlines = 6, 200, 10
    model = PoEModel.from_pretrained(tiny_dir, kv_cache_tokens=96)  # 6 blocks of 16: three 25-token sequences
    s = serve(model, tokenizer, max_queue=8)
    prompts = [prompt_ids(seed=300 + i, length=16 + i) for i in range(4)]
    modes = ["full", "speculative", "wand", "sampled"]
    jobs = [(i, modes[i % 4], prompts[(i // 4) % 4]) for i in range(num_requests + num_deadlines)]
    for _, mode, ids in jobs:
        expected(mode, ids, n)
    clients = [PoEClient(s.server.address, timeout=120) for _ in range(8)]
    first: dict[int, object] = {}  # request -> its first answer: tokens or a status
    final: dict[int, object] = {}  # after retrying RESOURCE_EXHAUSTED
    answers, lock = Counter(), threading.Lock()
    start = threading.Barrier(len(jobs))
    t0 = time.perf_counter()

    def run(i: int, mode: str, ids: list[int]) -> None:
        timeout = 0.05 if i >= num_requests else 60  # the last few leave early
        request = build_request(token_ids=ids, max_new_tokens=n, **MODES[mode][0])
        start.wait(timeout=60)
        for attempt in itertools.count():
            try:
                result = list(clients[i % 8].stub.Generate(request, timeout=timeout).token_ids)
            except grpc.RpcError as exc:
                result = exc.code()
            first.setdefault(i, result)
            with lock:
                answers["ok" if isinstance(result, list) else result.name] += 1
            if result != grpc.StatusCode.RESOURCE_EXHAUSTED or time.perf_counter() - t0 > 90:
                final[i] = result
                return
            time.sleep(min(0.05 * 2**attempt, 0.5) * (1 + (i % 7) / 7))  # exponential back-off, staggered

    threads = [threading.Thread(target=run, args=job, daemon=True) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, 120 - (time.perf_counter() - t0)))
    elapsed = time.perf_counter() - t0
    try:
        assert not any(t.is_alive() for t in threads), "requests still pending after 120 s: deadlock"
        for i, mode, ids in jobs:
            allowed = {grpc.StatusCode.RESOURCE_EXHAUSTED}
            if i >= num_requests:
                allowed.add(grpc.StatusCode.DEADLINE_EXCEEDED)
            assert first[i] == expected(mode, ids, n) or first[i] in allowed, f"request {i} ({mode}): {first[i]}"
            if i < num_requests:
                assert final[i] == expected(mode, ids, n), f"request {i} ({mode}) after retries: {final[i]}"
        released = wait_until_kv_free(model)
        rejected_first = sum(r == grpc.StatusCode.RESOURCE_EXHAUSTED for r in first.values())
        print(f"\noverload: {len(jobs)} concurrent requests ({num_deadlines} with a 50 ms deadline) in {elapsed:.1f}s; "
              f"first answers: {rejected_first} RESOURCE_EXHAUSTED; all answers incl. retries: {dict(answers)}; "
              f"KV back to baseline after {released * 1000:.0f} ms")
        assert rejected_first >= 1, "the server was not overloaded"
        assert not model.engine.waiting and not model.engine.running
        assert_still_serving(s, expected)
    finally:
        for c in clients:
            c.close()
        s.client.close()
        s.server.stop(0)


def test_a_hundred_long_calls_all_queue_in_the_engine_health_still_answers_and_cancelling_frees_them(
        tiny_dir, tokenizer, expected):
    """Every generation holds a gRPC handler thread until it ends. With the default queue, 100 long
    calls (KV for three at a time) must all reach the engine rather than wait for a handler thread
    in gRPC; a health check must still answer within a second; cancelling them all frees the KV."""
    num_calls, n = 100, 200
    model = PoEModel.from_pretrained(tiny_dir, kv_cache_tokens=3 * 224)  # three (16 + 200)-token sequences
    s = serve(model, tokenizer)  # default max_queue
    request = build_request(token_ids=prompt_ids(seed=500, length=16), max_new_tokens=n)
    try:
        calls = [s.client.stub.Generate.future(request, timeout=60) for _ in range(num_calls)]
        t0 = time.perf_counter()
        while len(model.engine.waiting) + len(model.engine.running) < num_calls and time.perf_counter() - t0 < 10:
            time.sleep(0.01)
        in_engine = len(model.engine.waiting) + len(model.engine.running)
        with PoEClient(s.server.address, timeout=1.0) as prober:
            t1 = time.perf_counter()
            health = prober.health()  # DEADLINE_EXCEEDED here: no handler thread was free
            health_ms = (time.perf_counter() - t1) * 1000
        for call in calls:
            call.cancel()
        released = wait_until_kv_free(model)
        print(f"\n{num_calls} long calls: {in_engine} reached the engine, health answered in {health_ms:.0f} ms; "
              f"all cancelled, KV back to baseline after {released * 1000:.0f} ms")
        assert in_engine == num_calls and health == "SERVING"
        assert not model.engine.waiting and not model.engine.running
        assert_still_serving(s, expected)
    finally:
        s.client.close()
        s.server.stop(0)


# ---- 5. soak -------------------------------------------------------------------------------
SOAK_SECONDS, SOAK_CLIENTS, SOAK_TOKENS = 20, 4, 8


def test_soak_mixed_modes_from_several_clients_gets_every_token_right(served, expected):
    prompts = [prompt_ids(seed=400 + i, length=12 + 7 * i) for i in range(3)]
    work = [(mode, ids) for ids in prompts for mode in MODES]
    for mode, ids in work:
        expected(mode, ids, SOAK_TOKENS)
    modes, failures, lock = Counter(), [], threading.Lock()
    wrong_tokens = 0
    stop_at = time.perf_counter() + SOAK_SECONDS

    def client_loop(c: int) -> None:
        nonlocal wrong_tokens
        with PoEClient(served.server.address, timeout=60) as client:
            i = c
            while time.perf_counter() < stop_at:
                mode, ids = work[i % len(work)]
                kwargs = dict(token_ids=ids, max_new_tokens=SOAK_TOKENS, **MODES[mode][0])
                try:
                    if i % 2:
                        got = [t for chunk in client.stream(**kwargs) for t in chunk.token_ids]
                    else:
                        got = list(client.generate(**kwargs).token_ids)
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(f"{mode}: {exc.code()} {exc.details()}")
                    continue
                finally:
                    i += SOAK_CLIENTS
                want = expected(mode, ids, SOAK_TOKENS)
                with lock:
                    modes[mode] += 1
                    wrong_tokens += sum(a != b for a, b in zip(got, want)) + abs(len(got) - len(want))

    threads = [threading.Thread(target=client_loop, args=(c,), daemon=True) for c in range(SOAK_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SOAK_SECONDS + 60)
    assert not any(t.is_alive() for t in threads), "a soak client hung"
    total = sum(modes.values()) + len(failures)
    print(f"\nsoak: {total} requests in {SOAK_SECONDS}s from {SOAK_CLIENTS} clients, "
          f"{SOAK_TOKENS} tokens each, by mode {dict(modes)}; {wrong_tokens} wrong tokens; {len(failures)} failed")
    assert failures == [] and wrong_tokens == 0
    assert set(modes) == set(MODES), f"every mode ran: {dict(modes)}"
    wait_until_kv_free(served.model)


def test_max_request_bytes_is_the_grpc_limit_too(tiny_dir, tokenizer):
    with PoEModel.from_pretrained(tiny_dir) as model:
        server = Server(model, tokenizer, port=0, max_request_bytes=2_000)
        try:
            with PoEClient(server.address, timeout=30) as client:
                with pytest.raises(grpc.RpcError) as err:
                    client.generate(prompt="x" * 3_000, max_new_tokens=2)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.details().startswith("prompt:") and "at most 2,000" in err.value.details()
                assert len(client.generate(token_ids=[1, 2, 3], max_new_tokens=2).token_ids) == 2
        finally:
            server.stop(grace=0)
