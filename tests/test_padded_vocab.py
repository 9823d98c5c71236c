"""A checkpoint whose head has more rows than its tokenizer has tokens (a padded vocabulary).

nanochat pads the head (`vocab_size` in config.json) past its tokenizer.pkl, and a model may emit
an id the tokenizer cannot decode. Here the tiny model has 512 head rows and its tokenizer 265
tokens (256 bytes and nanochat's 9 special tokens); its greedy continuation of "hello" holds such
ids. Token ids always come back; text is what the known ids decode to (the others give no text);
no RPC fails.
"""

from __future__ import annotations

import pickle

import pytest

from checkpoints.writer import init_checkpoint
from coordinator import PoEModel, load_tokenizer
from coordinator.grpc_api.server import Server
from coordinator.tokenizer import padded_encoding
from tools.client import PoEClient

TOKENIZER_VOCAB = 265
PROMPT = "hello"


@pytest.fixture(scope="module")
def padded_dir(tmp_path_factory):
    directory = init_checkpoint(tmp_path_factory.mktemp("padded"), "tiny", seed=0, short_window=16)
    (directory / "tokenizer.json").unlink()  # nanochat's format instead, with fewer tokens than the head
    encoding = padded_encoding({bytes([i]): i for i in range(256)}, TOKENIZER_VOCAB, "bytes")
    (directory / "tokenizer.pkl").write_bytes(pickle.dumps(encoding))
    return directory


@pytest.fixture(scope="module")
def served(padded_dir):
    model = PoEModel.from_pretrained(padded_dir)
    server = Server(model, load_tokenizer(padded_dir), port=0)
    with PoEClient(server.address, timeout=60) as client:
        yield model, client
    server.stop(0)


def known_text(ids: list[int]) -> str:
    """What the ids the tokenizer knows decode to: here, the byte tokens (specials give no text)."""
    return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace")


def test_the_model_emits_ids_past_the_tokenizer(served, padded_dir):
    model, _ = served
    tokenizer = load_tokenizer(padded_dir)
    assert tokenizer.vocab_size == TOKENIZER_VOCAB < model.config.vocab_size
    ids = tokenizer.encode(PROMPT)
    new = model.generate([ids], 16)[0, len(ids):].tolist()
    assert any(t >= TOKENIZER_VOCAB for t in new), f"the test needs ids the tokenizer lacks; got {new}"
    assert tokenizer.decode(new) == known_text(new)


@pytest.mark.parametrize("mode", ["full", "speculative", "wand"])
def test_generate_and_stream_return_every_id_and_the_text_of_known_ones(served, padded_dir, mode):
    model, client = served
    ids = load_tokenizer(padded_dir).encode(PROMPT)
    expected = model.generate([ids], 16)[0, len(ids):].tolist()  # greedy: every mode here gives these
    reply = client.generate(PROMPT, max_new_tokens=16, mode=mode)
    assert list(reply.token_ids) == expected and reply.text == known_text(expected)
    chunks = list(client.stream(PROMPT, max_new_tokens=16, mode=mode))
    assert [t for c in chunks for t in c.token_ids] == expected
    assert "".join(c.text for c in chunks) == known_text(expected) and chunks[-1].finish_reason == "length"


def test_a_model_output_with_unknown_ids_scores(served, padded_dir):
    model, client = served
    ids = load_tokenizer(padded_dir).encode(PROMPT)
    whole = model.generate([ids], 16)[0]  # (T,) prompt + new ids, some unknown to the tokenizer
    logprobs = model.forward(whole[None])[0, :-1].gather(1, whole[1:, None])[:, 0]
    scored = client.score(token_ids=whole.tolist())
    assert scored.token_logprobs == pytest.approx(logprobs.tolist(), abs=1e-4)
