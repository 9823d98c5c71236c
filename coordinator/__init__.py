"""The coordinator decides: Log-OP, the modes, scheduling, and serving over stage workers."""

from coordinator.model import PoEModel
from coordinator.tokenizer import Tokenizer, load_tokenizer

__all__ = ["PoEModel", "Tokenizer", "load_tokenizer"]
