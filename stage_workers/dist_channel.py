"""`DistChannel`: a one-way channel over torch.distributed point-to-point, for workers on
different machines or on different GPUs.

Each channel is a process group of its own with two ranks (0 the writer, 1 the reader), made
from the coordinator's TCPStore under the channel's name, so channels are built and dropped one
at a time as the topology changes (no world-wide group to re-form). A message goes as three
sends: a header {step, epoch, rows, bytes} and the marshalled plain part over gloo, then the
tensors' bytes as one buffer: over NCCL from GPU memory when the worker's device is a GPU, over
gloo otherwise. The reader receives on a thread of its own (a gloo receive cannot be polled)
and signals arrivals on a pipe, so `recv` waits on a file descriptor like `ShmChannel` and can
be interrupted the same way.

The writer connects on its first send, after it announces itself in the store; the reader's
thread joins the connection only once that announcement is there, waiting in short rounds, so a
channel that never carries a message (the result channel of a stage that never decides) holds
no thread inside gloo's connection setup, and `close()` ends the thread in every state. A peer
that goes away makes `recv` (and `send`) raise `ConnectionError`. This module knows the channel
wire format, nothing of what the messages mean.
"""

from __future__ import annotations

import datetime
import marshal
import os
import threading
from collections import deque

import torch
import torch.distributed as dist

from .framing import Envelope, Packed, aligned, drain, serialize, wait_for_message
from .messages import decode

HEADER_FIELDS = 5  # step, epoch, rows, marshalled bytes, tensor bytes
GROUP_TIMEOUT = datetime.timedelta(minutes=10)
ANNOUNCE_POLL_S = 0.05  # how often the reader's thread looks for its writer's announcement
JOIN_TIMEOUT_S = 5.0  # close() waits this long for the reader's thread to end


def _gloo(store, name: str, rank: int, host: str):
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    options._timeout = GROUP_TIMEOUT
    return dist.ProcessGroupGloo(dist.PrefixStore(name, store), rank, 2, options)


class DistChannel:
    def __init__(self, name: str, store_address: str, is_reader: bool, host: str, device: str = "cpu"):
        """`store_address`: HOST:PORT of the coordinator's TCPStore; `host`: this process's address
        as the peer reaches it; `device`: where tensors live (cuda: they travel over NCCL)."""
        self.name, self.is_reader, self.device = name, is_reader, torch.device(device)
        store_host, port = store_address.rsplit(":", 1)
        self._store = dist.TCPStore(store_host, int(port), is_master=False, timeout=GROUP_TIMEOUT)
        self._host = host
        self._groups = None  # (gloo for headers, the group for tensor bytes), made on first use
        self._arrived: deque[Envelope] = deque()
        self._notify_r, self._notify_w = os.pipe()  # wake-ups (not counts) for a reader waiting in select
        os.set_blocking(self._notify_r, False)
        self._closed = False
        self._closing = threading.Event()  # wakes the reader's thread while it waits for its writer
        self._error: Exception | None = None
        self._thread = None
        if is_reader:
            self._thread = threading.Thread(target=self._receive_forever, name=f"recv-{name}", daemon=True)
            self._thread.start()

    def _connect(self):
        if self._groups is None:
            rank = 1 if self.is_reader else 0
            if not self.is_reader:
                self._store.set(f"{self.name}/writer", self._host)  # the reader's thread joins once this is there
            control = _gloo(self._store, self.name, rank, self._host)
            data = control
            if self.device.type == "cuda":
                data = dist.ProcessGroupNCCL(dist.PrefixStore(self.name + "/nccl", self._store), rank, 2)
            self._groups = (control, data)
        return self._groups

    # ---- the writer --------------------------------------------------------------------------
    def send(self, message, step: int, epoch: int, rows: int = 0, deadline: float | None = None,
             interrupt=None) -> None:
        self.send_packed(serialize(message, step, epoch, rows, on_host=self.device.type != "cuda"))

    def send_packed(self, packed: Packed, deadline: float | None = None, interrupt=None, wake: bool = True) -> None:
        """Header and marshalled part over gloo; the tensors' bytes as one buffer (NCCL from a GPU).
        (Every message wakes the reader's thread: `wake` is a shared-memory saving.)"""
        assert not self.is_reader, f"channel {self.name}: the reader cannot send"
        try:
            self._send(packed)
        except RuntimeError as exc:  # gloo's word for a reset or closed connection
            raise ConnectionError(f"channel {self.name}: the peer went away ({exc})") from None

    def _send(self, packed: Packed) -> None:
        control, data = self._connect()
        stream_len = aligned(len(packed.stream))
        on_device = any(t.is_cuda for t in packed.tensors)
        payload = torch.zeros(packed.total - stream_len, dtype=torch.uint8, device=self.device if on_device else "cpu")
        for t, offset in zip(packed.tensors, packed.offsets):
            payload[offset - stream_len : offset - stream_len + t.nbytes] = t.reshape(-1).view(torch.uint8)
        header = torch.tensor([packed.step, packed.epoch, packed.rows, len(packed.stream), payload.numel()],
                              dtype=torch.int64)
        control.send([header], 1, 0).wait()
        control.send([torch.frombuffer(bytearray(packed.stream), dtype=torch.uint8)], 1, 1).wait()
        if payload.numel():
            (data if on_device else control).send([payload], 1, 2).wait()

    # ---- the reader --------------------------------------------------------------------------
    def _receive_forever(self) -> None:
        try:
            while not self._store.check([f"{self.name}/writer"]):  # not announced yet: look again unless closed
                if self._closing.wait(ANNOUNCE_POLL_S):
                    return
            control, data = self._connect()
            if self._closed:  # closed while connecting: close() may not have seen the groups
                self._abort()
            while not self._closed:
                header = torch.empty(HEADER_FIELDS, dtype=torch.int64)
                control.recv([header], 0, 0).wait()
                step, epoch, rows, stream_len, total = header.tolist()
                stream = torch.empty(stream_len, dtype=torch.uint8)
                control.recv([stream], 0, 1).wait()
                plain, metas = marshal.loads(stream.numpy().tobytes())
                on_device = self.device.type == "cuda"
                payload = torch.empty(total, dtype=torch.uint8, device=self.device if on_device else "cpu")
                if total:
                    (data if on_device else control).recv([payload], 0, 2).wait()
                tensors, offset = [], 0
                for dtype, shape in metas:
                    size = torch.Size(shape).numel() * torch.empty((), dtype=getattr(torch, dtype)).element_size()
                    tensors.append(payload[offset : offset + size].view(getattr(torch, dtype)).view(shape))
                    offset = -(-(offset + size) // 64) * 64
                self._arrived.append(Envelope(step, epoch, rows, decode(plain, tensors)))
                os.write(self._notify_w, b"\0")
        except Exception as exc:  # the channel was closed (its group aborted) or the peer went away
            if not self._closed:
                self._error = exc
                os.write(self._notify_w, b"!")  # the descriptors stay open until this thread has ended

    def fileno(self) -> int:
        return self._notify_r

    def pending(self) -> bool:
        return bool(self._arrived)

    def drain_wakeups(self) -> None:
        drain(self._notify_r)

    def recv(self, deadline: float | None = None, interrupt=None, also=()) -> Envelope:
        assert self.is_reader, f"channel {self.name}: the writer cannot receive"
        wait_for_message(self, deadline, interrupt, also, check=self._check_peer)
        return self._arrived.popleft()

    def failure(self) -> Exception | None:
        """Why the connection broke (the peer went away), or None."""
        return self._error

    def _check_peer(self) -> None:
        if self._error is not None:
            raise ConnectionError(f"channel {self.name}: the peer went away ({self._error})")

    def mark(self, value: int) -> None:
        """Progress marks are a shared-memory feature; over the network the coordinator waits for the step timeout."""

    def marked(self) -> int:
        return -1

    def _abort(self) -> None:
        for group in set(self._groups or ()):
            try:
                group.abort()
            except RuntimeError:
                pass

    def close(self) -> None:
        """Abort the connection and end the reader's thread (an interpreter must not exit with a
        thread inside gloo: it aborts)."""
        self._closed = True
        self._closing.set()
        self._abort()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
        for fd in (self._notify_r, self._notify_w):
            os.close(fd)
