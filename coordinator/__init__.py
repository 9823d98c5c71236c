"""The coordinator decides: Log-OP, the modes, scheduling, and serving over stage workers."""

from .model import PoEModel
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["PoEModel", "Tokenizer", "load_tokenizer"]
