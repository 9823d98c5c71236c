"""Channels: every step message crosses intact, big ones spill, waits are bounded and interruptible,
and a reader in another process sees what a writer sent."""

from __future__ import annotations

import math
import multiprocessing
import time
import uuid

import pytest
import torch

from stage_workers.channels import SHM_DIR, LocalChannel, ShmChannel
from stage_workers.controls import Controls
from stage_workers.framing import ChannelTimeout, Interrupted
from stage_workers.messages import (
    Boundary,
    Decision,
    Edge,
    Handoff,
    Rewire,
    SeqSpec,
    SeqStep,
    StepPlan,
    StepResult,
    TrunkState,
)
from stage_workers.sampling import SamplingParams


def name() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def pair():
    """A reader and a writer of one shared-memory channel (64 KiB slots x 2)."""
    n = name()
    reader = ShmChannel.create(n, 1 << 16, 2)
    writer = ShmChannel.attach(n, 1 << 16, 2)
    yield reader, writer
    writer.close()
    reader.close()


def messages():
    trunk = TrunkState(torch.randn(5, 8).bfloat16(), torch.randn(5, 8).bfloat16(), torch.randn(5, 8).bfloat16())
    specs = (SeqSpec(3, "sample", (0, 4), (1.0, 0.5), 0.25, SamplingParams(0.8, 5, 0.9, 7, 0.05),
                     controls=Controls(1.2, 0.5, 0.25, ((4, -2.0), (7, 100.0)), 3, (9,), 12)),
             SeqSpec(4, "wand", (0, 1), (1.0, 1.0), 0.0, exit_thresholds=(0.5, math.inf)),
             SeqSpec(5, "score", (0,), (1.0,), 0.0, top_n=2),
             SeqSpec(6, "speculative", (0, 1), (1.0, 1.0), 0.0, SamplingParams(0.8), draft_stage=0, logprobs=3),
             SeqSpec(7, "sample", (0, 4), (1.0, 1.0), 0.0, prefix_blocks=(5, 8), prefix_lengths=(2, 1), keep_rows=True,
                     prefix_tokens=tuple(range(32))))
    steps = ((SeqStep(3, 7, (11,), 10, 1, 7, "decide", (0.25,), masks=(b"\xff" * 8,)),),
             (SeqStep(5, 0, (1, 2, 3), -1, 0, 0, targets=(2, 3, -1)), SeqStep(4, 3, (9,), 8, 1, 2, "decide", (0.5, 0.75))))
    return [
        Boundary(9, 1, (Handoff(3, 4, 2, 1, False), Handoff(4, 0, 3, 0, True)), torch.arange(5), trunk,
                 torch.randn(1, 11)),
        Boundary(9, 0, (), torch.empty(0, dtype=torch.long), None, None),
        Boundary(3, 0, (Handoff(6, 7, 2, 2, True, 2),), torch.arange(2), trunk.select(slice(0, 2)),
                 torch.randn(2, 11), torch.rand(2, 11)),
        Boundary(2, 0, (Handoff(1, 0, 2, 0, False),), torch.arange(2),
                 TrunkState(torch.randn(2, 4).half(), torch.randn(2, 4).half(), None), None),
        StepPlan(12, 3, (1, 2), ((3, 9),), specs, steps, (10, 11), ((7, 2, 30, 1), (7, 3, -1, 0)), ((29, 0), (28, 2))),
        StepResult(12, 3, 4, (Decision(3, 1, 17), Decision(5, 0, logprobs=(-0.5, math.nan), top=(((1, -0.1),),))),
                   ((5, 0, torch.randn(3, 11)),)),
        StepResult(12, 3, 4, error="Traceback: boom"),
        StepResult(12, 3, 4, error="Traceback: PeerLost", lost_peer=2),
        Rewire(3, (Edge("a", 0, 1),), (Edge("b", 1, 2, 4096, 1),)),
    ]


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    elif isinstance(a, tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
    elif isinstance(a, TrunkState):
        for field in ("x", "x0", "x_backout"):
            u, v = getattr(a, field), getattr(b, field)
            assert (u is None) == (v is None) and (u is None or assert_same(u, v) is None)
    else:
        assert a == b


@pytest.mark.parametrize("index", range(len(messages())))
def test_every_step_message_crosses_a_shared_memory_channel_intact(pair, index):
    reader, writer = pair
    message = messages()[index]
    writer.send(message, step=12, epoch=3, rows=5)
    envelope = reader.recv(deadline=time.monotonic() + 5)
    assert (envelope.step, envelope.epoch, envelope.rows) == (12, 3, 5)
    assert_same(envelope.message, message)


def test_a_message_larger_than_a_slot_goes_through_a_file_that_is_removed_once_read(pair):
    reader, writer = pair
    big = Boundary(1, 0, (Handoff(0, 0, 4000, 0, False),), torch.arange(4000),
                   TrunkState(torch.randn(4000, 8), torch.randn(4000, 8), None), None)  # ~256 KB > a 64 KiB slot
    writer.send(big, 1, 0)
    assert list(SHM_DIR.glob(f"poe-{writer.name}.spill*")), "the message went to a file of its own"
    assert_same(reader.recv(time.monotonic() + 5).message, big)
    assert not list(SHM_DIR.glob(f"poe-{writer.name}.spill*"))


def test_a_writer_waits_for_a_free_slot_until_its_deadline(pair):
    reader, writer = pair
    message = messages()[1]
    writer.send(message, 1, 0)
    writer.send(message, 2, 0)  # both slots are now full
    with pytest.raises(ChannelTimeout, match="no slot was freed"):
        writer.send(message, 3, 0, deadline=time.monotonic() + 0.1)
    assert reader.recv(time.monotonic() + 1).step == 1
    writer.send(message, 3, 0, deadline=time.monotonic() + 1)  # a slot came free
    assert [reader.recv(time.monotonic() + 1).step for _ in range(2)] == [2, 3]


def test_a_waiting_reader_times_out_or_is_interrupted_by_the_watched_channel(pair):
    reader, _ = pair
    with pytest.raises(ChannelTimeout, match="nothing arrived"):
        reader.recv(deadline=time.monotonic() + 0.05)
    n = name()
    control, coordinator = ShmChannel.create(n, 1 << 16, 1), ShmChannel.attach(n, 1 << 16, 1)
    try:
        coordinator.send(messages()[-1], 0, 1)
        started = time.monotonic()
        with pytest.raises(Interrupted):
            reader.recv(deadline=time.monotonic() + 5, interrupt=control)
        assert time.monotonic() - started < 1, "it stopped waiting at once"
        assert control.pending(), "the interrupting message is left for its reader"
    finally:
        coordinator.close()
        control.close()


def _echo(inbound: str, outbound: str, count: int) -> None:
    source = ShmChannel.create(inbound, 1 << 16, 2)  # created after the writer started waiting for it
    sink = ShmChannel.attach(outbound, 1 << 16, 2)
    for _ in range(count):
        envelope = source.recv(time.monotonic() + 30)
        sink.send(envelope.message, envelope.step + 1, envelope.epoch)
    sink.close()
    source.close()


def test_a_worker_in_another_process_receives_what_was_sent_and_answers():
    there, back = name(), name()
    replies = ShmChannel.create(back, 1 << 16, 2)
    process = multiprocessing.get_context("spawn").Process(target=_echo, args=(there, back, 3))
    process.start()
    try:
        out = ShmChannel.attach(there, 1 << 16, 2, timeout=60)
        for i, message in enumerate(messages()[:3]):
            out.send(message, 10 * i, 1)
            envelope = replies.recv(time.monotonic() + 60)
            assert envelope.step == 10 * i + 1
            assert_same(envelope.message, message)
        out.close()
    finally:
        process.join(timeout=30)
        replies.close()
    assert process.exitcode == 0


def test_closing_and_unlinking_leave_no_files():
    n = name()
    reader, writer = ShmChannel.create(n, 1 << 16, 1), ShmChannel.attach(n, 1 << 16, 1)
    writer.close()
    reader.close()
    assert not list(SHM_DIR.glob(f"poe-{n}*"))
    orphan = ShmChannel.create(name(), 1 << 16, 1)  # as a reader that died would leave it
    ShmChannel.unlink(orphan.name)
    assert not list(SHM_DIR.glob(f"poe-{orphan.name}*"))
    with pytest.raises(ChannelTimeout, match="did not create"):
        ShmChannel.attach(name(), timeout=0.05)


def test_a_local_channel_passes_messages_in_order_and_refuses_to_wait():
    channel = LocalChannel()
    channel.send("a", 1, 0)
    channel.send("b", 2, 0)
    assert [channel.recv().message for _ in range(2)] == ["a", "b"]
    with pytest.raises(ChannelTimeout, match="in stage order"):
        channel.recv()


def _dist_echo(store: str, inbound: str, outbound: str, count: int) -> None:
    from stage_workers.dist_channel import DistChannel

    source = DistChannel(inbound, store, is_reader=True, host="127.0.0.1")
    sink = DistChannel(outbound, store, is_reader=False, host="127.0.0.1")
    for _ in range(count):
        envelope = source.recv(time.monotonic() + 60)
        sink.send(envelope.message, envelope.step + 1, envelope.epoch)
    sink.close()
    source.close()


def test_a_torch_distributed_channel_carries_every_message_between_processes():
    """Over gloo here; between GPUs the tensor bytes go over NCCL instead."""
    import datetime

    import torch.distributed as dist

    from stage_workers.dist_channel import DistChannel

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    address = f"127.0.0.1:{store.port}"
    there, back, sent = name(), name(), messages()
    process = multiprocessing.get_context("spawn").Process(target=_dist_echo, args=(address, there, back, len(sent)))
    process.start()
    out = DistChannel(there, address, is_reader=False, host="127.0.0.1")
    replies = DistChannel(back, address, is_reader=True, host="127.0.0.1")
    try:
        with pytest.raises(ChannelTimeout):
            replies.recv(time.monotonic() + 0.05)
        for i, message in enumerate(sent):
            out.send(message, 10 * i, 2)
            envelope = replies.recv(time.monotonic() + 60)
            assert (envelope.step, envelope.epoch) == (10 * i + 1, 2)
            assert_same(envelope.message, message)
    finally:
        process.join(timeout=60)
        out.close()
        replies.close()
    assert process.exitcode == 0


def test_a_message_waiting_on_the_interrupt_channel_without_a_wake_up_still_interrupts():
    """A plan may come without a wake-up (its worker is woken by upstream data), and a read of an
    earlier message may drain the wake-up of a later one: waiting for data must still see it."""
    data, control = ShmChannel.create(name()), ShmChannel.create(name())
    data_writer, control_writer = ShmChannel.attach(data.name), ShmChannel.attach(control.name)
    try:
        control_writer.send(StepPlan(1, 0), 1, 0, wake=False)
        with pytest.raises(Interrupted):
            data.recv(time.monotonic() + 5, interrupt=control)
        with pytest.raises(Interrupted):  # a sender waiting for a free slot too
            for step in range(data.num_slots + 1):
                data_writer.send(StepPlan(step, 0), step, 0, deadline=time.monotonic() + 5, interrupt=control)
    finally:
        for channel in (data_writer, control_writer, data, control):
            channel.close()


def test_a_torch_distributed_channel_that_never_carries_a_message_ends_its_thread_on_close():
    """The reader's thread waits for its writer in short rounds, outside gloo's connection setup,
    so close() ends it (an interpreter exiting with a thread inside gloo aborts)."""
    import datetime
    import threading

    import torch.distributed as dist

    from stage_workers.dist_channel import DistChannel

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    reader = DistChannel(name(), f"127.0.0.1:{store.port}", is_reader=True, host="127.0.0.1")
    time.sleep(0.3)
    assert reader.failure() is None
    reader.close()
    assert not [t for t in threading.enumerate() if t.name == f"recv-{reader.name}"]
