"""Sizing a worker's KV pool from its device's memory, like vLLM's `gpu_memory_utilization`.

A worker given `memory_fraction` may hold that share of its device's total memory, weights
included; its KV pool takes what is left after the weights, but never more than is free right
now (other processes may hold the rest). The fraction is of the *total*, not of what is free,
so workers that load side by side on one device get the same sizes whatever their order.
This module knows byte counts only; nothing of weights' values or of requests.
"""

from __future__ import annotations

import torch

MEMINFO = "/proc/meminfo"


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device: a GPU's own, or the host's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    fields = {}
    with open(MEMINFO) as f:  # Linux; values in kB
        for line in f:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    return fields["MemAvailable"], fields["MemTotal"]


def kv_tokens_for_memory(
    fraction: float, free: int, total: int, weight_bytes: int, bytes_per_position: int, block_size: int, stage: int
) -> int:
    """KV positions (whole blocks) that fit `fraction * total - weight_bytes`, capped by `free`."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"stage {stage}: memory_fraction={fraction!r} is invalid; allowed: a number in (0, 1]")
    budget = min(int(fraction * total) - weight_bytes, free)
    blocks = budget // (bytes_per_position * block_size)
    if blocks < 1:
        raise ValueError(
            f"stage {stage}: memory_fraction={fraction} of {total / 2**30:.1f} GiB leaves "
            f"{max(budget, 0) / 2**20:.0f} MiB for the KV cache after {weight_bytes / 2**20:.0f} MiB of weights "
            f"({free / 2**30:.1f} GiB free); one block of {block_size} positions needs "
            f"{bytes_per_position * block_size / 2**20:.2f} MiB. Allowed: a larger memory_fraction, or kv_cache_tokens"
        )
    return blocks * block_size
