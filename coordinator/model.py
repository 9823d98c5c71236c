"""`PoEModel`: the model card's Python surface, served by stage workers through the engine.

One front over two worker backends with the same worker interface: `from_pretrained` builds
`InProcessWorkers` (stage workers in this process, one per stage or several replicas of a
stage); `on_ray` places each worker in its own Ray actor (`RayCluster`,
coordinator/ray_cluster/cluster.py). Every method validates its arguments once, turns them
into requests, runs the engine until they finish and packs the results as the card returns
them. This module knows nothing of Ray or gRPC: a backend owns where its workers run.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from coordinator.core import requests as rq
from coordinator.core.autoscaler import Autoscaler, AutoscalingConfig, StageSignals
from coordinator.core.engine import Engine, EngineConfig
from coordinator.core.engine_loop import EngineLoop
from coordinator.core.pipeline import Pipeline
from coordinator.core.sequence import Sequence
from coordinator.core.wand import bounds_from_gaps, exit_gaps
from coordinator.tokenizer import load_tokenizer
from stage_workers.compute_thread import off_main_thread
from stage_workers.config import ModelConfig, load_config
from stage_workers.logop import combine, log_probs, normalize
from stage_workers.messages import WorkerLocation
from stage_workers.worker import StageWorker, WorkerSpec


class InProcessWorkers:
    """The in-process backend: stage workers in this process, reached over in-memory channels."""

    transport = None  # steps reach the workers in process (coordinator/core/transport.py)
    scalable = False  # the replica count is fixed at from_pretrained(replicas=...)

    def __init__(self, workers: list):
        self.workers = workers  # per stage, one worker or a list of that stage's replicas

    def busy_seconds(self, workers: list) -> list[float]:
        return [w.info().busy_s for w in workers]

    def locations(self, workers: list) -> list[WorkerLocation]:
        return [WorkerLocation("in-process", "127.0.0.1", w.info().device, os.getpid()) for w in workers]

    def scale_stage(self, model: "PoEModel", stage: int, replicas: int) -> None:
        raise ValueError("scale_stage: this model's stage workers run in process, where the replica count is "
                         "fixed at from_pretrained(replicas=...); allowed: a model on Ray (PoEModel.on_ray)")

    def close(self) -> None:
        """Nothing to release: the workers go with this process."""


class PoEModel:
    def __init__(self, config: ModelConfig, backend, engine_config: EngineConfig = EngineConfig(),
                 autoscaling: dict[int, AutoscalingConfig] | None = None, checkpoint: Path | None = None):
        """`backend`: where the stage workers run (`InProcessWorkers`, or `RayCluster`): its
        `workers` (per stage, one worker or a list of replicas), `transport` (how a step reaches
        them), `scalable`, `busy_seconds`, `scale_stage` and `close`. `autoscaling`: stage -> its policy; those
        stages' replicas follow their load (coordinator/core/autoscaler.py). `checkpoint`: its
        directory, whose tokenizer structured output reads."""
        assert len(backend.workers) == config.num_stages, "one worker (or list of replicas) per stage"
        self.config, self.backend = config, backend
        self.engine = Engine(config, Pipeline(backend.workers, backend.transport), engine_config)
        self.loop = EngineLoop(self.engine)  # the one thread that drives the engine; shared by all callers
        self.autoscaler = Autoscaler(self, autoscaling).start() if autoscaling else None
        self.checkpoint = checkpoint
        self._tokenizer = None

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=None, device=None, kv_cache_tokens: int | None = None,
                        replicas: list[int] | None = None, engine_config: EngineConfig = EngineConfig(),
                        memory_fraction: float | None = None):
        """`replicas`: workers per stage (default one each); each replica loads its own slice.
        KV pool per worker: `kv_cache_tokens` positions, else sized so each worker holds at most
        `memory_fraction` of the device's memory (weights included), else 8 x sequence_len."""
        config = load_config(path)
        replicas = replicas or [1] * config.num_stages
        if len(replicas) != config.num_stages or not all(isinstance(n, int) and n >= 1 for n in replicas):
            raise ValueError(f"replicas={replicas!r} is invalid; allowed: {config.num_stages} integers >= 1")
        device = str(device or "cpu")
        dtype = str(dtype).removeprefix("torch.") if dtype is not None else None
        specs = [WorkerSpec(stage=k, device=device, dtype=dtype, kv_cache_tokens=kv_cache_tokens,
                            memory_fraction=memory_fraction)
                 for k in range(config.num_stages)]
        # loaded off the main thread, which must not own an OpenMP team (stage_workers/compute_thread.py)
        workers = [[off_main_thread(StageWorker.from_checkpoint, path, spec) for _ in range(n)]
                   for spec, n in zip(specs, replicas)]
        return cls(config, InProcessWorkers(workers), engine_config, checkpoint=Path(path))

    @classmethod
    def on_ray(cls, checkpoint: str | Path, config=None, dtype=None, address: str | None = None) -> "PoEModel":
        """Each stage worker in its own Ray actor, placed by the serving config (a YAML path, a
        `ServingConfig`, or None for cluster_configs/local-cpu.yaml); starts a local Ray, or joins
        the one at `address`. `shutdown()` (or leaving a `with` block) releases it all."""
        from coordinator.ray_cluster.cluster import launch  # Ray is imported only with this backend

        return launch(cls, checkpoint, config, dtype, address)

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (loaded when first asked for)."""
        if self._tokenizer is None:
            if self.checkpoint is None:
                raise ValueError("structured_outputs needs the model's tokenizer; this model was built without a "
                                 "checkpoint directory (use from_pretrained or on_ray)")
            self._tokenizer = load_tokenizer(self.checkpoint)
        return self._tokenizer

    @property
    def workers(self) -> list:
        """Every stage worker, stage by stage (a stage's replicas side by side)."""
        return [w for stage in self.engine.stages for w in stage.workers]

    def stages_down(self) -> list[int]:
        """Stages with no live worker left (a lost worker Ray could not restart); empty when all serve."""
        return sorted(self.engine.stages_down)

    def replica_infos(self) -> list[tuple[int, object]]:
        """(replica index, WorkerInfo) of every worker, stage by stage, in `workers` order."""
        return [(r, w.info()) for stage in self.engine.stages for r, w in enumerate(list(stage.workers))]

    def worker_locations(self) -> list[tuple[int, int, WorkerLocation]]:
        """(stage, replica, where it runs) of every worker, stage by stage."""
        workers = [(k, r, w) for k, stage in enumerate(self.engine.stages) for r, w in enumerate(list(stage.workers))]
        return [(k, r, where) for (k, r, _), where in zip(workers, self.backend.locations([w for _, _, w in workers]))]

    def stage_signals(self) -> list[StageSignals]:
        """Each stage's load now (the autoscaler's and the busy-time metric's input): its replicas,
        their busy seconds, and its KV blocks promised and held. Read from outside the engine loop:
        a worker's busy time comes from the worker itself (a Ray call for an actor)."""
        stages = [(list(stage.workers), list(stage.promised), list(stage.capacity)) for stage in self.engine.stages]
        busy = iter(self.backend.busy_seconds([w for workers, _, _ in stages for w in workers]))
        return [StageSignals(len(workers), sum(next(busy) for _ in workers), sum(promised), sum(capacity))
                for workers, promised, capacity in stages]

    def scale_stage(self, stage: int, replicas: int) -> None:
        """Serve `stage` with `replicas` workers from now on, while requests run (on Ray): an added
        worker loads its slice before it takes sequences; a removed one's sequences move to the
        others (KV rebuilt from committed tokens, tokens unchanged)."""
        rq.check_stage(self.config, stage)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise ValueError(f"replicas={replicas!r} is invalid; allowed: an integer >= 1")
        self.backend.scale_stage(self, stage, replicas)

    def shutdown(self) -> None:
        """Stop the autoscaler and the engine loop, then release the workers (their actors, on Ray)."""
        if self.autoscaler is not None:
            self.autoscaler.stop()
        self.loop.stop()
        self.backend.close()

    def __enter__(self) -> "PoEModel":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- running requests ------------------------------------------------------------------
    def run(self, requests: list) -> list[Sequence]:
        """Run requests to completion, batched with whatever else is running; returns their sequences."""
        handles = [self.loop.submit(r, limit_queue=False) for r in requests]
        try:
            return [h.result() for h in handles]
        except BaseException:
            for h in handles:  # after an error, the other rows of the call end too
                self.loop.abort(h)
            raise

    def run_mode(self, input_ids, max_new_tokens, mode: rq.Mode, sampling=None, eos_token_id=None,
                 controls: dict | None = None) -> list[Sequence]:
        """Generate with a validated mode (coordinator/core/modes.py MODES builds one from its
        arguments by name); one finished sequence per prompt row. `controls`: decoding controls
        and cache_salt by name (rq.CONTROL_NAMES), each generate method's keyword arguments."""
        controls = dict(controls or {})
        unknown = sorted(set(controls) - set(rq.CONTROL_NAMES))
        if unknown:
            raise ValueError(f"{unknown[0]} is not an argument; allowed decoding controls: {', '.join(rq.CONTROL_NAMES)}")
        stop_ids = controls.pop("stop_token_ids", None)
        stop = rq.check_stop_ids(self.config, eos_token_id) | rq.check_stop_ids(self.config, stop_ids, "stop_token_ids")
        structured = self._structured(controls.pop("structured_outputs", None))
        salt = rq.check_cache_salt(controls.pop("cache_salt", None))
        checked = rq.check_controls(self.config, max_new_tokens, **controls)
        return self.run(rq.build_requests(self.config, input_ids, max_new_tokens, mode, sampling, stop, checked,
                                          structured, salt))

    def _structured(self, given: dict | None):
        """structured_outputs={kind: value} (vLLM's: json, regex, choice or grammar) compiled, or None."""
        if given is None:
            return None
        from coordinator.structured_output import compile_structured, one_kind  # xgrammar: only when asked for

        if not isinstance(given, dict):
            raise ValueError(f"structured_outputs={given!r} is invalid; allowed: a dict with one of json, regex, "
                             "choice or grammar")
        kind = one_kind(given, "structured_outputs", known_only=True)
        return compile_structured(self.tokenizer, self.config.vocab_size, *kind) if kind else None

    @staticmethod
    def _pack(seqs: list[Sequence], pad: int | None) -> torch.Tensor:
        """(B, T+n) prompt + new tokens; rows that stopped early are padded with the stop token."""
        width = max(seq.num_committed for seq in seqs)
        rows = [seq.tokens[: seq.num_committed] for seq in seqs]
        return torch.tensor([r + [pad if pad is not None else 0] * (width - len(r)) for r in rows], dtype=torch.long)

    # ---- the card's methods ----------------------------------------------------------------
    # Every generate method also takes the decoding controls by keyword (docs/modes.md, "Decoding controls"):
    # repetition_penalty, presence_penalty, frequency_penalty, logit_bias, min_tokens, stop_token_ids.
    def generate(self, input_ids, max_new_tokens, do_sample=False, temperature=1.0, top_k=None, top_p=None,
                 seed=None, eos_token_id=None, min_p=None, **controls) -> torch.Tensor:
        sampling = rq.check_sampling(do_sample, temperature, top_k, top_p, seed, min_p=min_p)
        seqs = self.run_mode(input_ids, max_new_tokens, rq.full_mode(self.config), sampling, eos_token_id, controls)
        return self._pack(seqs, eos_token_id)

    def generate_prefix(self, input_ids, max_stages, max_new_tokens, eos_token_id=None, **controls) -> torch.Tensor:
        mode = rq.prefix_mode(self.config, max_stages)
        return self._pack(self.run_mode(input_ids, max_new_tokens, mode, None, eos_token_id, controls), eos_token_id)

    def generate_stage(self, input_ids, stage, max_new_tokens, eos_token_id=None, **controls) -> torch.Tensor:
        mode = rq.stage_mode(self.config, stage)
        return self._pack(self.run_mode(input_ids, max_new_tokens, mode, None, eos_token_id, controls), eos_token_id)

    def generate_parallel_composition(self, input_ids, stages, stage_weights=None, max_new_tokens=32,
                                      eos_token_id=None, **controls) -> torch.Tensor:
        mode = rq.composition_mode(self.config, stages, stage_weights)
        return self._pack(self.run_mode(input_ids, max_new_tokens, mode, None, eos_token_id, controls), eos_token_id)

    def generate_wand(self, input_ids, max_new_tokens, safety=1.0, p99_bounds=None, return_stages_used=False,
                      eos_token_id=None, **controls):
        mode = rq.wand_mode(self.config, safety, p99_bounds)
        seqs = self.run_mode(input_ids, max_new_tokens, mode, None, eos_token_id, controls)
        out = self._pack(seqs, eos_token_id)
        if not return_stages_used:
            return out
        width = max(len(seq.stages_used) for seq in seqs)
        used = [seq.stages_used + [-1] * (width - len(seq.stages_used)) for seq in seqs]
        return out, torch.tensor(used, dtype=torch.long)

    def generate_speculative(self, input_ids, draft_stage=0, k_draft=3, max_new_tokens=32,
                             return_acceptance=False, eos_token_id=None, do_sample=False, temperature=1.0,
                             top_k=None, top_p=None, seed=None, min_p=None, **controls):
        """Greedy: identical to `generate`. With do_sample=True: speculative sampling, distributed
        exactly as `generate`'s sampling with the same filters (docs/modes.md)."""
        mode = rq.speculative_mode(self.config, draft_stage, k_draft)
        sampling = rq.check_sampling(do_sample, temperature, top_k, top_p, seed, min_p=min_p)
        seqs = self.run_mode(input_ids, max_new_tokens, mode, sampling, eos_token_id, controls)
        out = self._pack(seqs, eos_token_id)
        if not return_acceptance:
            return out
        rates = [seq.num_accepted / seq.num_proposed if seq.num_proposed else 0.0 for seq in seqs]
        return out, rates[0] if len(rates) == 1 else rates

    def stage_logits(self, input_ids, stages: tuple[int, ...]) -> list[dict[int, torch.Tensor]]:
        """Per row: stage -> (T, V) fp32 logits at every position."""
        rows = rq.check_prompts(self.config, input_ids)
        seqs = self.run([rq.LogitsRequest(tuple(row), stages) for row in rows])
        return [{k: seq.decoder.stage_logits(k) for k in stages} for seq in seqs]

    def forward_stage(self, input_ids, stage) -> torch.Tensor:
        rq.check_stage(self.config, stage)
        return torch.stack([row[stage] for row in self.stage_logits(input_ids, (stage,))])  # (B, T, V)

    def forward(self, input_ids) -> torch.Tensor:
        """(B, T, V) full-PoE normalized log-probs."""
        mode = rq.full_mode(self.config)
        rows = self.stage_logits(input_ids, mode.stages)
        scores = [combine([log_probs(row[k]) for k in mode.stages], mode.weights, self.config.poe_alpha) for row in rows]
        return normalize(torch.stack(scores))

    def calibrate_wand(self, sequences, quantile: float = 0.99) -> list[float]:
        """One bound per stage (spec section 4); the last stage's is 0."""
        if not isinstance(quantile, (int, float)) or not 0 <= quantile <= 1:
            raise ValueError(f"quantile={quantile!r} is invalid; allowed: a number in [0, 1]")
        K, alpha = self.config.num_stages, self.config.poe_alpha
        gaps: list[list[torch.Tensor]] = [[] for _ in range(K)]
        for row in self.stage_logits(sequences, tuple(range(K))):
            lps = [log_probs(row[k]) for k in range(K)]  # K x (T, V)
            full = combine(lps, [1.0] * K, alpha)
            for j in range(K):
                gaps[j].append(exit_gaps(combine(lps[: j + 1], [1.0] * (j + 1), alpha), full))
        return bounds_from_gaps([torch.cat(g) for g in gaps], quantile)
