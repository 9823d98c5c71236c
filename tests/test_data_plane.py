"""The data plane: what reaches the coordinator, and what travels between stages.

On Ray, every tensor that arrives in the coordinator's process is rebuilt from bytes there
(`torch.from_numpy` or torch's own unpickling), so recording those calls shows what crossed.
`forward` (stage logits, not a decode step) proves the recorder sees arrivals; generation in
every mode must then bring no tensor with the vocabulary or hidden dimension: only token ids,
exit stages and acceptance come back, and boundary states go from stage to stage.
"""

from __future__ import annotations

import pytest
import torch

from coordinator.core import requests as rq


class ArrivalRecorder:
    """Records the shape of every tensor rebuilt from received bytes in this process."""

    def __init__(self, monkeypatch):
        self.shapes: list[tuple[int, ...]] = []
        for owner, name in ((torch, "from_numpy"), (torch, "frombuffer"), (torch._utils, "_rebuild_tensor_v2")):
            original = getattr(owner, name)

            def recording(*args, _original=original, **kwargs):
                t = _original(*args, **kwargs)
                self.shapes.append(tuple(t.shape))
                return t

            monkeypatch.setattr(owner, name, recording)

    def take(self) -> list[tuple[int, ...]]:
        shapes, self.shapes = self.shapes, []
        return shapes


def generation_calls(config):
    K = config.num_stages
    return {
        "full": lambda m, ids: m.generate(ids, 6),
        "sampled": lambda m, ids: m.generate(ids, 6, do_sample=True, temperature=0.9, top_p=0.9, seed=3),
        "prefix": lambda m, ids: m.generate_prefix(ids, 2, 6),
        "stage": lambda m, ids: m.generate_stage(ids, K - 1, 6),
        "composition": lambda m, ids: m.generate_parallel_composition(ids, [0, K - 1], [0.5, 1.0], 6),
        "wand": lambda m, ids: m.generate_wand(ids, 6, p99_bounds=[0.6] * (K - 1) + [0.0]),
        "speculative": lambda m, ids: m.generate_speculative(ids, 0, 3, 6),
    }


def test_no_vocabulary_or_hidden_state_tensor_reaches_the_coordinator_in_generation(ray_session, tiny_dir,
                                                                                    monkeypatch):
    from coordinator import PoEModel

    with PoEModel.on_ray(tiny_dir) as cluster:
        config = cluster.config
        V, C = config.vocab_size, config.n_embd
        ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
        cluster.generate(ids, 2)  # warm-up: the first steps of every worker
        recorder = ArrivalRecorder(monkeypatch)
        cluster.forward(ids)  # stage logits at every position: these do come back
        assert any(V in shape for shape in recorder.take()), "the recorder sees what arrives"
        for mode, call in generation_calls(config).items():
            call(cluster, ids)
            arrived = recorder.take()
            assert not [s for s in arrived if V in s or C in s], f"{mode}: tensors of shapes {arrived} arrived"


def test_in_process_reports_of_a_generation_step_hold_only_numbers(tiny_model):
    transport = tiny_model.engine.pipeline.transport
    reports = []
    run = transport.run

    def recording(plan, *expected):
        results = run(plan, *expected)
        reports.extend(results)
        return results

    transport.run = recording
    try:
        ids = torch.randint(0, tiny_model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
        for call in generation_calls(tiny_model.config).values():
            call(tiny_model, ids)
    finally:
        del transport.run
    assert reports and all(r.logits == () for r in reports)
    for r in reports:
        for d in r.decisions:
            assert all(isinstance(v, (int, float, tuple)) for v in d), d


@pytest.mark.parametrize("mode, sums_from", [("stage", "the last stage"), ("full", "stage 0")])
def test_log_op_sums_travel_only_from_the_first_weighted_stage_and_only_for_head_positions(tiny_model, mode,
                                                                                         sums_from):
    """A single-stage request never ships a vocabulary-sized sum between stages; full PoE ships one
    row per sequence per hop (the prompt's other positions travel as boundary states only)."""
    from stage_workers.channels import LocalChannel

    K = tiny_model.config.num_stages
    sent = []
    original = LocalChannel.send

    def recording(channel, message, step, epoch, **kwargs):
        sent.append(0 if message.acc is None else message.acc.shape[0])
        return original(channel, message, step, epoch, **kwargs)

    LocalChannel.send = recording
    try:
        ids = torch.randint(0, tiny_model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
        if mode == "stage":
            tiny_model.generate_stage(ids, K - 1, 4)
        else:
            tiny_model.generate(ids, 4)
    finally:
        LocalChannel.send = original
    assert sent, "stages handed rows on"
    if sums_from == "the last stage":
        assert set(sent) == {0}
    else:
        assert set(sent) == {1}, "one sum per hop: the position that needs a distribution"


def parked_bytes(model) -> tuple[int, int]:
    """(bytes of the rows workers keep for later, bytes of the storage behind them)."""
    own = behind = 0
    for runner in model.engine.pipeline.transport.runners.values():
        for rows in [*runner.state.parked.values(), *runner.state.held.values()]:
            tensors = [rows.token_ids, rows.acc] + ([] if rows.trunk is None else
                                                    [rows.trunk.x, rows.trunk.x0, rows.trunk.x_backout])
            for t in (t for t in tensors if t is not None):
                own += t.nbytes
                behind += t.untyped_storage().nbytes()
    return own, behind


def test_memory_of_deferred_states_is_exactly_what_is_owed_over_a_long_wand_run(tiny_dir):
    """Rows parked for a later catch-up are copies of their own, not views that keep whole batch
    messages alive: at every step of a long WAND run the bytes parked, and the bytes behind them,
    are exactly those of the positions the stages owe (num_computed[k-1] - num_computed[k] rows
    parked at stage k, each a token id and its boundary state: no Log-OP sums once a token was
    decided; a finished sequence's until they are freed), and nothing stays after."""
    from coordinator import PoEModel

    model = PoEModel.from_pretrained(tiny_dir)
    config = model.config
    K, C = config.num_stages, config.n_embd
    # a row parked at stage k: its token id (int64), x and x0 and, once stage k-1 passed the middle
    # layer, the backout residual (fp32)
    row_bytes = [0] + [8 + (3 if config.stage_boundaries[k - 1] >= config.backout_layer else 2) * C * 4
                       for k in range(1, K)]
    assert len(set(row_bytes[1:])) == 2, "boundaries before and after the middle layer: both row sizes are checked"
    ids = torch.randint(0, config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(3))
    jobs = rq.build_requests(config, ids, 160, rq.wand_mode(config, 1.0, [0.6] * (K - 1) + [0.0]))
    samples = []
    step = model.engine.step

    def sampling_step():
        stepped = step()  # the sequences it ran; those that finished are forgotten with the next plan,
        # or at once when nothing else runs (the engine flushes its frees)
        known = {seq.seq_id: seq for seq in [*model.engine.running, *stepped]}.values() if model.engine.running else ()
        owed = sum((seq.num_computed[k - 1] - seq.num_computed[k]) * row_bytes[k] for seq in known for k in range(1, K))
        samples.append((*parked_bytes(model), owed))
        return stepped

    model.engine.step = sampling_step
    seqs = model.run(jobs)
    model.loop.stop()
    assert any(min(s.stages_used) < K - 1 for s in seqs), "tokens exited early, so states were parked"
    assert max(own for own, _, _ in samples) > 0
    for own, behind, owed in samples:
        assert own == behind, "a parked row holds only itself"
        assert own == owed, f"{own} bytes parked for {owed} bytes of positions owed"
    assert samples[-1][:2] == (0, 0), "nothing stays parked once the sequences are done"


def test_the_cluster_over_torch_distributed_channels_gives_the_same_tokens(ray_session, tiny_dir, tiny_model):
    """Every channel over torch.distributed (gloo here; what workers on different hosts use, with
    NCCL between GPUs): the same tokens in every mode."""
    from coordinator import PoEModel
    from coordinator.serving_config import ServingConfig

    config = tiny_model.config
    ids = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    with PoEModel.on_ray(tiny_dir, config=ServingConfig(transport="dist")) as cluster:
        transport = cluster.engine.pipeline.transport
        assert {e.kind for w in transport.wiring.values() for e in w.inbound + w.outbound} == {"dist"}
        for mode, call in generation_calls(config).items():
            assert torch.equal(call(cluster, ids), call(tiny_model, ids)), mode
        assert torch.allclose(cluster.forward(ids), tiny_model.forward(ids), atol=1e-5)
