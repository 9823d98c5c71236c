"""One-way message channels between a writer and a reader: in memory, or in shared memory.

A channel carries the data plane's messages (stage_workers/messages.py) from one writer to one
reader, each tagged with a header {step, epoch, rows, flags}: a reader drops what is left over
from an aborted step or an older topology instead of mistaking it for the current one.

- `LocalChannel`: a queue in one process, for the in-process model, which runs its workers one
  after another (everything a worker receives was sent before it runs).
- `ShmChannel`: processes on one node. A ring of fixed-size slots in a file under /dev/shm,
  mapped by both sides, and two FIFOs of one byte per slot: "ready" (writer -> reader: a slot
  was filled) and "free" (reader -> writer: a slot can be reused). The FIFOs are how a side
  sleeps until the other acts, and their system calls order the slot's bytes between
  processes. A message is its plain part (`marshal`led tuples: stage_workers/messages.py
  `encode`) followed by its tensors' raw bytes (one copy in, one copy out); one larger than a
  slot goes through a file of its own, named in the slot. The reader creates the channel; the
  writer attaches.

Every wait takes a deadline and may also watch another channel (`interrupt`): a worker waiting
for its upstream stops as soon as the coordinator sends something new (an aborted step, a
rewiring), so a step never hangs on a dead peer. The reader can also leave a progress mark
after the slots that the writer reads at any time (a worker's last finished step, which tells
a waiting coordinator which worker is stuck). This module knows nothing of what the messages
mean.
"""

from __future__ import annotations

import errno
import marshal
import math
import mmap
import os
import select
import struct
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from .framing import ChannelTimeout, Envelope, Interrupted, Packed, aligned, drain, layout, serialize, wait_for_message
from .messages import decode

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
# magic, flags, step, epoch, rows, marshalled bytes, tensors, total bytes
HEADER = struct.Struct("<4sIqqqqqq")
COUNTERS = struct.Struct("<qq")  # after the slots: messages written (by the writer), the reader's progress mark
COUNTER = struct.Struct("<q")  # one of them
MAGIC = b"PoE1"
SPILLED = 1  # flag: the message is in a file of its own, named after the header
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
                "int32": np.int32, "int16": np.int16, "uint8": np.uint8, "bool": np.bool_}
ITEMSIZE = {**{name: np.dtype(d).itemsize for name, d in NUMPY_DTYPES.items()}, "bfloat16": 2}


class LocalChannel:
    """A channel inside one process: a FIFO of messages, nothing copied."""

    def __init__(self, name: str = "local"):
        self.name = name
        self._queue: deque[Envelope] = deque()

    def send(self, message, step: int, epoch: int, rows: int = 0, deadline: float | None = None,
             interrupt=None) -> None:
        self._queue.append(Envelope(step, epoch, rows, message))

    def recv(self, deadline: float | None = None, interrupt=None) -> Envelope:
        if not self._queue:
            raise ChannelTimeout(f"channel {self.name}: nothing was sent (in-process workers run in stage order)")
        return self._queue.popleft()

    def pending(self) -> bool:
        return bool(self._queue)

    def close(self) -> None:
        self._queue.clear()


def open_channel(edge, is_reader: bool, host: str = "127.0.0.1", device: str = "cpu", timeout: float = 60.0):
    """The channel an `Edge` names, as its reader (which creates it) or its writer (which attaches).
    `host`: this process's address as a peer reaches it; `device`: this worker's (an nccl edge's tensors)."""
    if edge.kind in ("dist", "nccl"):
        from .dist_channel import DistChannel  # torch.distributed only where a channel needs it

        return DistChannel(edge.name, edge.store, is_reader, host, device if edge.kind == "nccl" else "cpu")
    if is_reader:
        return ShmChannel.create(edge.name, edge.slot_bytes, edge.num_slots)
    return ShmChannel.attach(edge.name, edge.slot_bytes, edge.num_slots, timeout=timeout)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A host tensor's bytes, without a copy (numpy has no bfloat16: its bits go as int16)."""
    array = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    return memoryview(array).cast("B")


def _tensor_of(data: bytearray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.frombuffer(data, dtype=np.int16).reshape(shape)).view(torch.bfloat16)
    return torch.from_numpy(np.frombuffer(data, dtype=NUMPY_DTYPES[dtype]).reshape(shape))


def _put(target: memoryview, base: int, packed) -> None:
    """Lay a header and an encoded message out at byte `base`: the marshalled part, then each
    tensor's bytes."""
    flags, step, epoch, rows, stream, tensors, total, offsets = packed
    HEADER.pack_into(target, base, MAGIC, flags, step, epoch, rows, len(stream), len(tensors), total)
    start = base + HEADER.size
    target[start : start + len(stream)] = stream
    for t, offset in zip(tensors, offsets):
        target[start + offset : start + offset + t.nbytes] = _bytes_of(t)


def _take(view: memoryview, base: int, name: str):
    """Read back what `_put` laid out: (flags, step, epoch, rows, message); tensors are copies."""
    magic, flags, step, epoch, rows, stream_len, _, _ = HEADER.unpack_from(view, base)
    if magic != MAGIC:
        raise RuntimeError(f"channel {name}: no message at byte {base} (magic {magic!r})")
    start = base + HEADER.size
    plain, metas = marshal.loads(view[start : start + stream_len])
    tensors, offset = [], aligned(stream_len)
    for dtype, shape in metas:
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        tensors.append(_tensor_of(bytearray(view[start + offset : start + offset + nbytes]), dtype, shape))
        offset = aligned(offset + nbytes)
    return flags, step, epoch, rows, plain if flags & SPILLED else decode(plain, tensors)


def _paths(name: str, *suffixes: str) -> tuple[Path, ...]:
    return tuple(SHM_DIR / f"poe-{name}{suffix}" for suffix in suffixes)


class ShmChannel:
    """A ring of `num_slots` slots of `slot_bytes` in shared memory; see the module docstring."""

    def __init__(self, name: str, slot_bytes: int, num_slots: int, is_reader: bool):
        self.name, self.slot_bytes, self.num_slots, self.is_reader = name, slot_bytes, num_slots, is_reader
        self.paths = _paths(name, ".ring", ".ready", ".free")
        fd = os.open(self.paths[0], os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, slot_bytes * num_slots + COUNTERS.size)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        flags = os.O_RDWR | os.O_NONBLOCK  # both ends held by both sides: no EOF, no SIGPIPE, no blocking open
        self._ready, self._free = os.open(self.paths[1], flags), os.open(self.paths[2], flags)
        self._count = 0  # messages sent (writer) or received (reader): the next slot is count % num_slots
        self._spills = 0

    @classmethod
    def create(cls, name: str, slot_bytes: int = 1 << 20, num_slots: int = 4) -> "ShmChannel":
        """The reader's side: make the ring and the FIFOs, with every slot free."""
        assert slot_bytes >= 4096 and num_slots >= 1, f"channel {name}: slots of {slot_bytes} bytes x {num_slots}"
        ring, staged, ready, free = _paths(name, ".ring", ".staged", ".ready", ".free")
        fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, slot_bytes * num_slots + COUNTERS.size)
        finally:
            os.close(fd)
        for fifo in (ready, free):
            os.mkfifo(fifo, 0o600)
        os.rename(staged, ring)  # the ring appears last: a writer that sees it finds the FIFOs
        channel = cls(name, slot_bytes, num_slots, is_reader=True)
        os.write(channel._free, b"\0" * num_slots)
        return channel

    @classmethod
    def attach(cls, name: str, slot_bytes: int = 1 << 20, num_slots: int = 4, timeout: float = 60.0) -> "ShmChannel":
        """The writer's side: wait (up to `timeout`) for the reader to create the channel."""
        (ring,) = _paths(name, ".ring")
        deadline = time.monotonic() + timeout
        while not ring.exists():
            if time.monotonic() > deadline:
                raise ChannelTimeout(f"channel {name}: its reader did not create {ring} within {timeout:.0f}s")
            time.sleep(0.002)
        return cls(name, slot_bytes, num_slots, is_reader=False)

    @staticmethod
    def unlink(name: str) -> None:
        """Remove a channel's files whatever became of its reader (a process that died leaves them)."""
        for path in _paths(name, ".ring", ".ready", ".free", ".staged"):
            path.unlink(missing_ok=True)
        for spill in SHM_DIR.glob(f"poe-{name}.spill*"):
            spill.unlink(missing_ok=True)

    # ---- the reader's progress mark ------------------------------------------------------------
    def mark(self, value: int) -> None:
        """The reader records how far it got (a worker: the last step it finished), for the writer
        to read without any message: one store, no wake-up."""
        COUNTER.pack_into(self._map, self.num_slots * self.slot_bytes + COUNTER.size, value)

    def marked(self) -> int:
        return COUNTERS.unpack_from(self._map, self.num_slots * self.slot_bytes)[1]

    def _written(self) -> int:
        return COUNTERS.unpack_from(self._map, self.num_slots * self.slot_bytes)[0]

    # ---- waiting ----------------------------------------------------------------------------
    def fileno(self) -> int:
        """Readable while a message waits (the reader's side): what `interrupt` watches."""
        return self._ready

    def pending(self) -> bool:
        """A message waits (the reader's side)."""
        return self._written() > self._count

    def drain_wakeups(self) -> None:
        """Forget pending wake-ups: they are not counts (the written count says what waits)."""
        drain(self._ready)

    def _take_token(self, fd: int, deadline: float | None, interrupt, what: str) -> None:
        watch = [fd] if interrupt is None else [fd, interrupt.fileno()]
        while True:
            try:
                os.read(fd, 1)
                return
            except BlockingIOError:
                pass
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise ChannelTimeout(f"channel {self.name}: {what} before the deadline")
            if interrupt is not None and interrupt.pending():  # it may have come without a wake-up
                raise Interrupted(f"channel {self.name}: interrupted while waiting ({what})")
            ready = select.select(watch, [], [], wait)[0]
            if interrupt is not None and interrupt.fileno() in ready and fd not in ready:
                raise Interrupted(f"channel {self.name}: interrupted while waiting ({what})")

    # ---- the writer --------------------------------------------------------------------------
    def send(self, message, step: int, epoch: int, rows: int = 0, deadline: float | None = None,
             interrupt=None, wake: bool = True) -> None:
        self.send_packed(serialize(message, step, epoch, rows), deadline, interrupt, wake)

    def send_packed(self, packed: Packed, deadline: float | None = None, interrupt=None, wake: bool = True) -> None:
        """`wake`: also wake the reader; False when something else will (a worker's upstream data)
        and the message can wait in its slot until then."""
        assert not self.is_reader, f"channel {self.name}: the reader cannot send"
        if HEADER.size + packed.total > self.slot_bytes:  # too large for a slot: a file of its own, named in the slot
            spill = f"{self.name}.spill{self._spills}"
            self._spills += 1
            self._write_spill(spill, packed)
            stream = marshal.dumps((spill, ()))
            total, offsets = layout(stream, [])
            packed = packed._replace(flags=SPILLED, stream=stream, tensors=[], total=total, offsets=offsets)
        self._take_token(self._free, deadline, interrupt, "no slot was freed")
        base = (self._count % self.num_slots) * self.slot_bytes
        self._count += 1
        _put(self._view, base, packed)
        COUNTER.pack_into(self._map, self.num_slots * self.slot_bytes, self._count)  # after the slot's bytes
        if wake:
            os.write(self._ready, b"\0")  # the system call also orders the stores above for the reader

    @staticmethod
    def _write_spill(spill: str, packed: Packed) -> None:
        fd = os.open(SHM_DIR / f"poe-{spill}", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            size = HEADER.size + packed.total
            os.ftruncate(fd, size)
            with mmap.mmap(fd, size) as spill_map:
                view = memoryview(spill_map)
                _put(view, 0, packed)
                view.release()
        finally:
            os.close(fd)

    # ---- the reader --------------------------------------------------------------------------
    def recv(self, deadline: float | None = None, interrupt=None, also=()) -> Envelope:
        """The next message, waiting for it until `deadline`; a message on `interrupt` raises
        Interrupted; readable `also` channels wake the wait too (messages may come without a wake-up)."""
        assert self.is_reader, f"channel {self.name}: the writer cannot receive"
        wait_for_message(self, deadline, interrupt, also)
        base = (self._count % self.num_slots) * self.slot_bytes
        self._count += 1
        flags, step, epoch, rows, message = _take(self._view, base, self.name)
        os.write(self._free, b"\0")  # the slot's bytes are copied out: the writer may reuse it
        if flags & SPILLED:
            flags, step, epoch, rows, message = self._read_spill(message)
        return Envelope(step, epoch, rows, message)

    def _read_spill(self, spill: str):
        path = SHM_DIR / f"poe-{spill}"
        fd = os.open(path, os.O_RDONLY)
        try:
            with mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ) as spill_map:
                view = memoryview(spill_map)
                try:
                    return _take(view, 0, self.name)
                finally:
                    view.release()
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)

    def failure(self) -> None:
        """Shared memory does not break: a peer's death is found by the coordinator's liveness check."""
        return None

    def close(self) -> None:
        self._view.release()
        self._map.close()
        for fd in (self._ready, self._free):
            try:
                os.close(fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
        if self.is_reader:
            for path in self.paths:
                path.unlink(missing_ok=True)
