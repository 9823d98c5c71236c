"""Checkpoints this project makes: random presets (writer.py) and the embedded trained default."""

from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).parent / "default"  # written by `poe-serve train`
