"""`poe-serve bench` end to end on the tiny checkpoint: every section runs and reports sane figures.

Timings are never asserted (this machine is noisy); what is checked is that each section ran,
that served tokens were correct where the bench compares them, and that nothing errored.
"""

from __future__ import annotations

import json

from tools.bench import SECTIONS, BenchConfig, run_bench


def test_bench_runs_every_section_and_writes_json(ray_session, tiny_dir, tmp_path):
    cfg = BenchConfig(checkpoint=str(tiny_dir), trained=str(tiny_dir), prompt_len=20, new_tokens=4,
                      concurrency=(1, 3), transport_tokens=5)
    report = run_bench(cfg, json_out=str(tmp_path / "bench.json"), plot_out=str(tmp_path / "bench.png"))
    assert json.loads((tmp_path / "bench.json").read_text()).keys() == report.keys()
    assert {"floor", "single_stream", "transport", "concurrency", "modes", "speculative", "wand"} <= report.keys()
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert all(row["errors"] == 0 and row["requests_ok"] == row["concurrency"] for row in report["concurrency"])
    assert report["speculative"]["same_tokens_as_full"]
    assert [w["stage"] for w in report["modes"]["workers"]] == [0, 1, 2, 3]
    assert all(w["rss_mib"] > 0 and w["parameters"] > 0 for w in report["modes"]["workers"])
    assert set(report["transport"]["us_per_token"]) == {"channels", "plain", "plain_no_logits", "chained", "compiled"}
    assert report["transport"]["per_hop_us"] > 0


def test_bench_sections_are_validated():
    try:
        BenchConfig(checkpoint="x", trained="x", sections=("floor", "warp"))
    except ValueError as exc:
        assert "'warp'" in str(exc) and all(s in str(exc) for s in SECTIONS)
    else:
        raise AssertionError("an unknown section must be refused")
