"""Every generation mode as gRPC client arguments beside the same call on `PoEModel`.

Shared by the gRPC and reliability suites: a served reply must carry exactly the tokens the
reference call gives for the same prompt (the tiny checkpoint's four stages).
"""

from __future__ import annotations

BOUNDS = [0.6, 0.6, 0.6, 0.0]
# name -> (client kwargs, reference call on a (1, T) prompt tensor)
MODES = {
    "full": (dict(mode="full"), lambda m, ids, n: m.generate(ids, n)),
    "prefix": (dict(mode="prefix", max_stages=2), lambda m, ids, n: m.generate_prefix(ids, 2, n)),
    "stage": (dict(mode="stage", stage=1), lambda m, ids, n: m.generate_stage(ids, 1, n)),
    "composition": (dict(mode="composition", stages=[3, 0], stage_weights=[1.0, 0.5]),
                    lambda m, ids, n: m.generate_parallel_composition(ids, [3, 0], [1.0, 0.5], n)),
    "wand": (dict(mode="wand", safety=1.0, p99_bounds=BOUNDS),
             lambda m, ids, n: m.generate_wand(ids, n, 1.0, BOUNDS)),
    "speculative": (dict(mode="speculative", draft_stage=0, k_draft=3),
                    lambda m, ids, n: m.generate_speculative(ids, 0, 3, n)),
    "sampled": (dict(mode="full", temperature=0.8, top_k=50, top_p=0.9, seed=7),
                lambda m, ids, n: m.generate(ids, n, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=7)),
}
