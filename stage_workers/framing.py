"""What both shared channel kinds (shared memory, torch.distributed) share: a message serialized
once as a marshalled plain part plus its tensors laid out at aligned offsets (`serialize`), the
envelope a reader gets back, and the wait for a message that a coordinator's channel may
interrupt. It knows nothing of slots, rings or process groups.
"""

from __future__ import annotations

import marshal
import os
import select
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .messages import encode

ALIGN = 64


class ChannelTimeout(TimeoutError):
    """Nothing arrived (or no slot freed) before the deadline."""


class Interrupted(RuntimeError):
    """The watched channel got a message while this one was waited on."""


@dataclass
class Envelope:
    step: int
    epoch: int
    rows: int
    message: object


class Packed(NamedTuple):
    """A message encoded once (`serialize`), to send on one channel or several."""

    flags: int
    step: int
    epoch: int
    rows: int
    stream: bytes  # the marshalled plain part, with each tensor's dtype and shape
    tensors: list[torch.Tensor]  # contiguous; on the host unless packed for a device channel
    total: int  # bytes of the stream and the tensors, laid out (ALIGN-aligned)
    offsets: list[int]  # each tensor's offset in that layout


def serialize(message, step: int, epoch: int, rows: int = 0, on_host: bool = True) -> Packed:
    plain, tensors = encode(message)
    tensors = [t.detach().cpu().contiguous() if on_host else t.detach().contiguous() for t in tensors]
    metas = tuple((str(t.dtype).removeprefix("torch."), tuple(t.shape)) for t in tensors)
    stream = marshal.dumps((plain, metas))
    return Packed(0, step, epoch, rows, stream, tensors, *layout(stream, tensors))


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def layout(stream: bytes, tensors: list[torch.Tensor]) -> tuple[int, list[int]]:
    """Bytes of a message after the header, and each tensor's offset from the header's end."""
    offset = aligned(len(stream))
    offsets = []
    for t in tensors:
        offsets.append(offset)
        offset = aligned(offset + t.nbytes)
    return offset, offsets


def wait_for_message(channel, deadline: float | None, interrupt, also=(), check=None) -> None:
    """Until `channel.pending()`: sleep on its wake-up descriptor (`fileno()`) and on `also`
    (other channels whose messages may come first; here they only wake the wait), unless a message
    is already there. A message waiting on `interrupt` while nothing arrived raises Interrupted,
    whether or not it came with a wake-up (one read earlier may have drained it); `check()` runs
    before each sleep (to raise what the channel learnt meanwhile)."""
    watch = [channel.fileno(), *also] + ([] if interrupt is None else [interrupt.fileno()])
    while not channel.pending():
        if check is not None:
            check()
        if interrupt is not None and interrupt.pending():
            raise Interrupted(f"channel {channel.name}: interrupted while waiting (nothing arrived)")
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            raise ChannelTimeout(f"channel {channel.name}: nothing arrived before the deadline")
        ready = select.select(watch, [], [], wait)[0]
        if channel.fileno() in ready:
            channel.drain_wakeups()
        if interrupt is not None and interrupt.fileno() in ready and not channel.pending():
            raise Interrupted(f"channel {channel.name}: interrupted while waiting (nothing arrived)")
        for other in also:
            if other in ready:
                other.drain_wakeups()


def drain(fd: int) -> None:
    """Read a non-blocking descriptor empty."""
    try:
        while os.read(fd, 1 << 12):
            pass
    except BlockingIOError:
        pass
