"""A worker's decode step asks the device for nothing until its results are read.

There is no GPU here, so the step runs on PyTorch's `meta` device (shapes, no data) under a
dispatch mode that watches every op. On a GPU, each of these stalls the host until the device
catches up: an op whose output size depends on device data (boolean indexing, `nonzero`,
`.item()`), a blocking host-to-device copy, and a host tensor used as an operand of a device op
(PyTorch copies it over, blocking). Device tensors that appear without an op the mode saw came
from `torch.tensor(..., device=...)`, which is a blocking copy too.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from stage_workers.messages import ExtendBatch, Segment, TrunkState
from stage_workers.transfer import pack_to_device, to_device, to_host
from stage_workers.worker import StageWorker, WorkerSpec

DATA_DEPENDENT = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), int(t), bool(t)
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
}
COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class HostSyncAudit(TorchDispatchMode):
    """Records every op that would stall the host if `device` were a GPU."""

    def __init__(self, device: str, resident: list[torch.Tensor]):
        super().__init__()
        self.device, self.stalls = torch.device(device), []
        self.known = WeakIdKeyDictionary({t: True for t in resident})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if t.device == self.device]
        if func in DATA_DEPENDENT:
            self.stalls.append(f"{func}: the output depends on device data")
        if func is torch.ops.aten.index.Tensor and on_device and any(t.dtype == torch.bool for t in tensors[1:]):
            self.stalls.append(f"{func}: boolean indexing (nonzero) on the device")
        if func in COPIES:
            self._check_copy(func, args, kwargs)
        elif on_device and any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            self.stalls.append(f"{func}: a host tensor is an operand of a device op (a blocking copy)")
        for t in on_device:
            if t not in self.known:
                self.stalls.append(f"{func}: a device tensor no seen op made (torch.tensor(..., device=)?)")
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.known[t] = True
        return out

    def _check_copy(self, func, args, kwargs) -> None:
        if func is torch.ops.aten._to_copy.default:
            src, dst, non_blocking = args[0].device, kwargs.get("device", args[0].device), kwargs.get("non_blocking", False)
        else:
            src, dst, non_blocking = args[1].device, args[0].device, args[2] if len(args) > 2 else False
        if src != dst and not non_blocking:
            self.stalls.append(f"{func}: a blocking copy {src} -> {dst}")


def meta_worker(checkpoint_dir, stage: int) -> StageWorker:
    return StageWorker.from_checkpoint(checkpoint_dir, WorkerSpec(stage=stage, device="meta", dtype="bfloat16"))


def resident_tensors(worker: StageWorker) -> list[torch.Tensor]:
    return [*worker.slice.parameters(), worker.cache.k, worker.cache.v, worker.cos, worker.sin]


def decode_batch(worker: StageWorker, seq_lengths: list[int]) -> ExtendBatch:
    """One new position per sequence after `seq_lengths` cached ones, as the pipeline sends it."""
    segments = [Segment(seq_id, n, 1, num_logits=1) for seq_id, n in enumerate(seq_lengths)]
    N, C = len(segments), worker.config.n_embd
    trunk = None
    if worker.stage:  # a boundary state from upstream, arriving on the host as from a Ray actor
        trunk = TrunkState(torch.randn(N, C), torch.randn(N, C), torch.randn(N, C))
    return ExtendBatch(
        segments=segments,
        token_ids=torch.randint(0, worker.config.vocab_size, (N,)),
        prev_token_ids=torch.randint(0, worker.config.vocab_size, (N,)) if worker.stage == 0 else None,
        trunk=trunk,
    )


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_a_decode_step_on_a_device_needs_no_host_sync(tiny_dir, stage):
    worker = meta_worker(tiny_dir, stage)
    seq_lengths = [3, 17, 40]  # past the short window of 16
    for seq_id, n in enumerate(seq_lengths):
        worker.cache.reserve(seq_id, n)
    batch = decode_batch(worker, seq_lengths)
    with HostSyncAudit("meta", resident_tensors(worker)) as audit:
        result = worker.extend(batch)
    assert audit.stalls == []
    assert result.logits.shape == (len(seq_lengths), worker.config.vocab_size)
    assert result.logits.device.type == "meta"
    assert [worker.cache.length(i) for i in range(len(seq_lengths))] == [n + 1 for n in seq_lengths]


def test_a_prefill_chunk_with_heads_needs_no_host_sync(tiny_dir):
    worker = meta_worker(tiny_dir, 0)
    worker.cache.reserve(0, 5)
    segments = [Segment(0, 5, 20, num_logits=3), Segment(1, 0, 7, num_logits=0)]
    batch = ExtendBatch(segments, torch.randint(0, 100, (27,)), prev_token_ids=torch.tensor([9, -1]))
    with HostSyncAudit("meta", resident_tensors(worker)) as audit:
        result = worker.extend(batch)
    assert audit.stalls == []
    assert result.logits.shape == (3, worker.config.vocab_size)
    assert result.trunk.x.shape == (27, worker.config.n_embd)


def test_the_audit_catches_what_would_stall_a_gpu():
    """The audit is only worth its silence if it speaks up on each kind of stall."""
    resident = torch.zeros(4, device="meta")
    cases = {
        "boolean indexing": lambda: resident[resident > 0],
        "blocking copy": lambda: torch.arange(4).to("meta"),
        "host operand": lambda: resident + torch.arange(4),
        "unseen device tensor": lambda: resident + torch.tensor([1.0, 2, 3, 4], device="meta"),
    }
    for what, op in cases.items():
        with HostSyncAudit("meta", [resident]) as audit:
            try:
                op()
            except (NotImplementedError, RuntimeError):  # meta refuses some after the audit saw them
                pass
        assert audit.stalls, f"the audit missed a {what}"


def test_pack_to_device_keeps_shapes_and_values():
    tensors = [torch.arange(6).view(2, 3), torch.tensor([7]), torch.empty(0, dtype=torch.long)]
    moved = pack_to_device(tensors, torch.device("meta"))
    assert [t.shape for t in moved] == [t.shape for t in tensors]
    assert all(t.device.type == "meta" for t in moved)
    assert pack_to_device(tensors, torch.device("cpu")) is tensors  # nothing to move


def test_to_device_and_to_host_are_no_ops_on_the_cpu():
    t = torch.randn(3, 4)
    assert to_device(t, torch.device("cpu")) is t
    back = to_host([t, None])
    assert back[1] is None and torch.equal(back[0], t)


def decode_positions(worker, lengths: list[int]) -> ExtendBatch:
    """One new position per sequence after `lengths` cached ones, every row with logits."""
    N, C = len(lengths), worker.config.n_embd
    g = torch.Generator().manual_seed(sum(lengths))
    trunk = None if worker.stage == 0 else TrunkState(*(torch.randn(N, C, generator=g) for _ in range(3)))
    return ExtendBatch([Segment(seq_id, n, 1, 1) for seq_id, n in enumerate(lengths)],
                       torch.randint(0, worker.config.vocab_size, (N,), generator=g),
                       torch.randint(0, worker.config.vocab_size, (N,), generator=g) if worker.stage == 0 else None,
                       trunk)


@pytest.mark.parametrize("stage", [0, 2])
def test_the_bucketed_decode_step_of_a_cuda_graph_gives_the_dynamic_steps_results(tiny_dir, stage):
    """Padding to a batch bucket (scratch-block rows) and to a key-span bucket changes no result;
    on the CPU the graph's step runs eagerly, the same code a GPU captures."""
    from stage_workers.decode_graphs import DecodeGraphs

    dynamic = StageWorker.from_checkpoint(tiny_dir, WorkerSpec(stage=stage))
    static = StageWorker.from_checkpoint(tiny_dir, WorkerSpec(stage=stage))
    graphs = DecodeGraphs(static, capture=False)
    for worker in (dynamic, static):  # the same cached prefix in both
        prefix = ExtendBatch([Segment(i, 0, n) for i, n in enumerate((5, 40, 70))], torch.arange(115) % 97,
                             torch.tensor([-1, -1, -1]) if stage == 0 else None,
                             None if stage == 0 else TrunkState(*(torch.randn(115, 64, generator=torch.Generator()
                                                                               .manual_seed(k)) for k in range(3))))
        worker.extend(prefix)
    batch = decode_positions(dynamic, [5, 40, 70])
    static.cache.reserve(0, 6), static.cache.reserve(1, 41), static.cache.reserve(2, 71)
    expected = dynamic.extend(batch)
    got = graphs.run(batch)
    assert torch.allclose(got.logits, expected.logits, atol=1e-5)
    assert got.logits.shape == (3, dynamic.config.vocab_size)
    assert torch.allclose(got.trunk.x, expected.trunk.x, atol=1e-5)
    for layer in range(len(static.slice.layers)):  # the real sequences' keys are the same; padding wrote elsewhere
        slots = static.cache.slots(static.cache.padded_tables([0, 1, 2]), torch.tensor([[5], [40], [70]]))
        assert torch.allclose(static.cache.k[layer][slots.flatten()], dynamic.cache.k[layer][slots.flatten()], atol=1e-5)


def test_the_bucketed_decode_step_needs_no_host_sync(tiny_dir):
    from stage_workers.decode_graphs import DecodeGraphs

    worker = meta_worker(tiny_dir, 1)
    batch = decode_positions(worker, [3, 17, 40])
    for seq_id, n in enumerate([3, 17, 40]):
        worker.cache.reserve(seq_id, n + 1)  # as extend does before it runs the step
    graphs = DecodeGraphs(worker, capture=False)
    with HostSyncAudit("meta", resident_tensors(worker)) as audit:
        result = graphs.run(batch)
    assert audit.stalls == []
    assert result.logits.shape == (3, worker.config.vocab_size)


def test_every_mode_through_the_bucketed_decode_step_gives_the_plain_models_tokens(tiny_dir, tiny_model):
    from coordinator.model import InProcessWorkers, PoEModel

    config = tiny_model.config
    workers = [StageWorker.from_checkpoint(tiny_dir, WorkerSpec(stage=k, cuda_graphs=True)) for k in range(config.num_stages)]
    model = PoEModel(config, InProcessWorkers(workers))
    K = config.num_stages
    bucketed = []
    run = workers[2].decode_graphs.run
    workers[2].decode_graphs.run = lambda batch: (bucketed.append(len(batch.segments)), run(batch))[1]
    ids = torch.randint(0, config.vocab_size, (3, 30), generator=torch.Generator().manual_seed(11))
    for call in (lambda m: m.generate(ids, 8), lambda m: m.generate(ids, 8, do_sample=True, top_p=0.9, seed=2),
                 lambda m: m.generate_wand(ids, 8, p99_bounds=[0.6] * (K - 1) + [0.0]),
                 lambda m: m.generate_speculative(ids, 0, 3, 8), lambda m: m.generate_stage(ids, 1, 8)):
        assert torch.equal(call(model), call(tiny_model))
    assert bucketed, "decode steps took the bucketed path"
    model.loop.stop()
