"""Moving tensors between the host and a worker's device without stalling the host.

A host-to-device copy made the plain way (`t.to("cuda")` from pageable memory) waits for the
device to drain its queue, and so does every D2H read. Here host data goes through pinned
memory as non-blocking copies, several small index tensors share one copy, and results come
back with every copy started before the one wait. On the CPU all of this is a no-op. This
module knows nothing about what the tensors mean.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor on `device`; from the host, queued behind the device's work instead of waiting for it."""
    if t.device == device:
        return t
    if t.device.type != "cpu":  # device -> host must wait for the data (to_host batches that wait)
        return t.to(device)
    if device.type == "cuda":
        t = t.pin_memory()  # a pinned source lets the copy run asynchronously
    return t.to(device, non_blocking=True)


def pack_to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """int64 host tensors on `device` in one copy: views of one device buffer, shapes kept."""
    if all(t.device == device for t in tensors):
        return tensors
    flat = to_device(torch.cat([t.reshape(-1) for t in tensors]), device)  # (sum of numel,)
    parts = flat.split([t.numel() for t in tensors])
    return [part.view(t.shape) for part, t in zip(parts, tensors)]


def to_host(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Device tensors on the CPU: every copy is started, then one wait for all of them."""
    moved = [None if t is None else t.to("cpu", non_blocking=True) for t in tensors]
    devices = {t.device for t in tensors if t is not None and t.device.type == "cuda"}
    for device in devices:
        torch.cuda.current_stream(device).synchronize()  # non-blocking D2H copies land in pinned memory
    return moved
