"""Offline training data: the Python standard library's own source, a BPE tokenizer trained on
it, and the token stream for training and validation.

Files are split by a hash of their path (about 4% held out for validation, half of that for
WAND calibration and half for evaluation), so the split is the same on every machine with the
same Python. Every document starts with `<|bos|>`. Nothing here knows about models.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

from coordinator.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, padded_encoding

SPLITS = ("train", "calib", "eval")


def stdlib_files() -> list[Path]:
    """The stdlib's .py files. site-packages is never entered: walking it took seconds, and failed
    when a package was being installed or removed meanwhile."""
    files = []
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [d for d in subfolders if d != "site-packages"]
        files.extend(Path(folder) / name for name in names if name.endswith(".py"))
    return sorted(files)


def split_of(path: Path) -> str:
    """Deterministic: 2% calib, 2% eval, the rest train."""
    bucket = int(hashlib.sha1(path.name.encode() + str(path.parent.name).encode()).hexdigest(), 16) % 100
    return "calib" if bucket < 2 else "eval" if bucket < 4 else "train"


def read_split(split: str) -> list[str]:
    assert split in SPLITS, f"split must be one of {SPLITS}"
    return [p.read_text(errors="replace") for p in stdlib_files() if split_of(p) == split]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """nanochat's recipe: rustbpe learns the merges with nanochat's split pattern, tiktoken encodes."""
    try:
        import rustbpe
    except ImportError:
        raise ImportError("training needs rustbpe: pip install 'poe-serve[train]'") from None
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    return Tokenizer(padded_encoding(ranks, vocab_size, name="poe-stdlib"))


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """One flat uint16 stream, each document prefixed by <|bos|>."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
    return np.asarray(ids, dtype=np.uint16)
