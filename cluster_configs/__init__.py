"""YAML placement configs: how stage workers map onto CPUs, GPUs and nodes (see the README)."""
