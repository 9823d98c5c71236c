"""Text <-> token ids on tiktoken, loaded safely from a checkpoint directory.

Two on-disk formats: nanochat's `tokenizer.pkl` (a pickled `tiktoken.Encoding`), read by a
restricted unpickler that admits nothing but the Encoding's plain state, and this project's
`tokenizer.json` (no pickle at all). `load_tokenizer(dir)` prefers the JSON. The tokenizer
knows nothing about models or stages.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
from pathlib import Path

import tiktoken
import torch

PICKLE_FILE = "tokenizer.pkl"
JSON_FILE = "tokenizer.json"
JSON_FORMAT = "poe-serve-tiktoken-v1"
BOS = "<|bos|>"
SPECIAL_TOKENS = (  # nanochat's, in its order
    BOS,
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)
# nanochat's split pattern (GPT-4's with \p{N}{1,2})
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


class UnsafePickleError(ValueError):
    """A tokenizer pickle asked for something other than a tiktoken Encoding's state."""


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: it only records the state."""

    def __setstate__(self, state):
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    ALLOWED = {("tiktoken.core", "Encoding"), ("tiktoken", "Encoding")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return _EncodingState
        raise UnsafePickleError(
            f"tokenizer pickle refers to {module}.{name}; only tiktoken.core.Encoding is allowed "
            "(nothing from the file was executed)"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError("tokenizer pickle uses persistent ids, which are not allowed")


def _encoding_from_state(state, source: str) -> tiktoken.Encoding:
    if not isinstance(state, dict):
        raise ValueError(f"{source}: expected a tiktoken Encoding state dict, got {type(state).__name__}")
    expected = {"name": str, "pat_str": str, "mergeable_ranks": dict, "special_tokens": dict}
    for key, kind in expected.items():
        if not isinstance(state.get(key), kind):
            raise ValueError(f"{source}: Encoding state field {key!r} must be a {kind.__name__}")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    if not all(isinstance(k, bytes) and isinstance(v, int) for k, v in ranks.items()):
        raise ValueError(f"{source}: mergeable_ranks must map bytes to int")
    if not all(isinstance(k, str) and isinstance(v, int) for k, v in specials.items()):
        raise ValueError(f"{source}: special_tokens must map str to int")
    return tiktoken.Encoding(
        name=state["name"], pat_str=state["pat_str"], mergeable_ranks=ranks, special_tokens=specials
    )


def load_pickle_encoding(path: str | Path) -> tiktoken.Encoding:
    """Unpickle nanochat's tokenizer.pkl without running any code it names."""
    data = Path(path).read_bytes()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except Exception as exc:  # malformed pickle streams raise many types
        raise ValueError(f"{path}: not a readable tokenizer pickle ({exc})") from None
    if not isinstance(obj, _EncodingState) or not hasattr(obj, "state"):
        raise ValueError(f"{path}: expected a pickled tiktoken.Encoding")
    return _encoding_from_state(obj.state, str(path))


class Tokenizer:
    """HF-like surface over a tiktoken Encoding; `<|bos|>` is prepended by default.

    A model may have more ids than its tokenizer (nanochat pads the head past its tokenizer.pkl):
    ids the tokenizer does not know decode to no text and count no bytes.
    """

    def __init__(self, encoding: tiktoken.Encoding, bos_token: str = BOS):
        self.encoding = encoding
        if bos_token not in encoding._special_tokens:
            raise ValueError(f"tokenizer has no {bos_token} special token")
        self.bos_token_id = encoding._special_tokens[bos_token]
        self.special_ids = frozenset(encoding._special_tokens.values())
        self.known_ids = frozenset(encoding._mergeable_ranks.values()) | self.special_ids

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.encoding.encode_ordinary(text)
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of the ids; unknown ids give none, and bytes that are not UTF-8 give U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [i for i in ids if i in self.known_ids and not (skip_special_tokens and i in self.special_ids)]
        return self.encoding.decode(ids, errors="replace")

    def token_texts(self, ids) -> list[str]:
        """Each token's own text, special tokens included (U+FFFD where a token is part of a character)."""
        return [self.decode([i], skip_special_tokens=False) for i in ids]

    def num_bytes(self, token_id: int) -> int:
        """UTF-8 bytes of a token's text: 0 for special and unknown ids (bits per byte count none)."""
        if token_id in self.special_ids or token_id not in self.known_ids:
            return 0
        return len(self.encoding.decode_single_token_bytes(token_id))

    def __call__(self, text: str | list[str], return_tensors: str | None = None, add_special_tokens: bool = True):
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.encode(t, add_special_tokens) for t in texts]
        if return_tensors is None:
            return {"input_ids": rows[0] if isinstance(text, str) else rows}
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; allowed: None, 'pt'")
        if len({len(r) for r in rows}) > 1:
            raise ValueError("texts encode to different lengths; pass them one at a time (no padding is applied)")
        return {"input_ids": torch.tensor(rows, dtype=torch.long)}

    # ---- the project's own, pickle-free format ---------------------------------------------
    def save(self, directory: str | Path) -> Path:
        enc = self.encoding
        ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        assert [r for _, r in ranks] == list(range(len(ranks))), "mergeable ranks must be 0..n-1"
        path = Path(directory) / JSON_FILE
        path.write_text(
            json.dumps(
                {
                    "format": JSON_FORMAT,
                    "name": enc.name,
                    "pat_str": enc._pat_str,
                    "special_tokens": enc._special_tokens,
                    "mergeable_ranks": [base64.b64encode(b).decode("ascii") for b, _ in ranks],
                }
            )
        )
        return path


def load_json_encoding(path: str | Path) -> tiktoken.Encoding:
    try:
        raw = json.loads(Path(path).read_text())
        if raw.get("format") != JSON_FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, expected {JSON_FORMAT!r}")
        ranks = {base64.b64decode(b): i for i, b in enumerate(raw["mergeable_ranks"])}
        state = {**raw, "mergeable_ranks": ranks}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a poe-serve tokenizer file ({exc})") from None
    return _encoding_from_state(state, str(path))


def load_tokenizer(directory: str | Path) -> Tokenizer:
    directory = Path(directory)
    if (directory / JSON_FILE).is_file():
        return Tokenizer(load_json_encoding(directory / JSON_FILE))
    if (directory / PICKLE_FILE).is_file():
        return Tokenizer(load_pickle_encoding(directory / PICKLE_FILE))
    raise FileNotFoundError(f"no {JSON_FILE} or {PICKLE_FILE} in {directory}")


def byte_level_encoding(vocab_size: int, name: str = "poe-bytes") -> tiktoken.Encoding:
    """256 byte tokens, unreachable fillers up to vocab_size - 9, then nanochat's special tokens.

    Fillers (`\\xff` + 3 index bytes) can never be produced by encoding text (no merge forms
    them and `\\xff` is not UTF-8), so a random model's vocab can exceed what text uses.
    """
    return padded_encoding({bytes([i]): i for i in range(256)}, vocab_size, name)


def padded_encoding(ranks: dict[bytes, int], vocab_size: int, name: str) -> tiktoken.Encoding:
    num_regular = vocab_size - len(SPECIAL_TOKENS)
    if num_regular < len(ranks):
        raise ValueError(f"vocab_size={vocab_size} is too small for {len(ranks)} tokens + {len(SPECIAL_TOKENS)} special")
    ranks = dict(ranks)
    for i in range(len(ranks), num_regular):
        ranks[b"\xff" + i.to_bytes(3, "big")] = i
    specials = {tok: num_regular + j for j, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
