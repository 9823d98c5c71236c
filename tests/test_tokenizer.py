"""Tokenizer: BOS handling, both file formats, and a pickle loader that executes nothing."""

from __future__ import annotations

import pickle

import pytest
import tiktoken
import torch

from coordinator import load_tokenizer
from coordinator.tokenizer import Tokenizer, UnsafePickleError, byte_level_encoding, load_pickle_encoding

TEXT = "def f(x):\n    return x  # é漢字"


@pytest.fixture
def encoding():
    return byte_level_encoding(512)


def test_bos_is_prepended_by_default_and_skipped_on_decode(encoding):
    tok = Tokenizer(encoding)
    ids = tok.encode(TEXT)
    assert ids[0] == tok.bos_token_id and tok.encode(TEXT, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|bos|>")


def test_hf_style_call_returns_tensors(encoding):
    tok = Tokenizer(encoding)
    batch = tok("abc", return_tensors="pt")
    assert torch.equal(batch["input_ids"], torch.tensor([[tok.bos_token_id, 97, 98, 99]]))
    with pytest.raises(ValueError, match="return_tensors"):
        tok("abc", return_tensors="np")


def test_json_format_round_trips(encoding, tmp_path):
    Tokenizer(encoding).save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(TEXT) == Tokenizer(encoding).encode(TEXT) and loaded.vocab_size == 512


def test_nanochat_pickle_loads_through_the_restricted_unpickler(encoding, tmp_path):
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(encoding))
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded.encoding, tiktoken.Encoding)
    assert loaded.encode(TEXT) == Tokenizer(encoding).encode(TEXT)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch EXPLOITED",))


def test_a_malicious_pickle_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(UnsafePickleError, match=r"os\.system|posix\.system"):
        load_pickle_encoding(path)
    assert not (tmp_path / "EXPLOITED").exists()


def test_an_encoding_pickle_smuggling_code_in_its_state_is_refused(encoding, tmp_path):
    class Smuggler:
        def __reduce__(self):
            return (tiktoken.Encoding, (), {"name": _Exploit(), "pat_str": "x", "mergeable_ranks": {}, "special_tokens": {}})

    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(Smuggler()))
    with pytest.raises(UnsafePickleError):
        load_pickle_encoding(path)


def test_garbage_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="tokenizer.pkl"):
        load_pickle_encoding(path)


def test_missing_tokenizer_names_both_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.pkl"):
        load_tokenizer(tmp_path)


def test_filler_tokens_are_never_produced_by_encoding(encoding):
    tok = Tokenizer(encoding)
    ids = tok.encode("".join(chr(c) for c in range(32, 2000)))
    assert max(ids[1:]) < 256


def test_ids_the_tokenizer_does_not_know_decode_to_no_text_and_count_no_bytes():
    """A padded head has ids past the tokenizer (nanochat); decoding a model's output must not fail."""
    tok = Tokenizer(byte_level_encoding(300))
    ids = [104, 300, 105, 511, tok.bos_token_id, 0xC3, 0xA9]  # "h", unknown, "i", unknown, <|bos|>, "é"
    assert tok.decode(ids) == "hié"
    assert tok.decode(ids, skip_special_tokens=False) == "hi<|bos|>é"
    assert tok.decode(torch.tensor([300, 301])) == ""
    assert [tok.num_bytes(t) for t in ids] == [1, 0, 1, 0, 0, 1, 1]
