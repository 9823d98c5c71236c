"""`poe-serve bench` end to end on the tiny checkpoint: every section runs and reports sane figures.

Timings are never asserted (this machine is noisy); what is checked is that each section ran,
that served tokens were correct where the bench compares them, and that nothing errored.
"""

from __future__ import annotations

import json

from tools.bench import SECTIONS, BenchConfig, run_bench


def test_bench_runs_every_section_and_writes_json(ray_session, tiny_dir, tmp_path):
    cfg = BenchConfig(checkpoint=str(tiny_dir), trained=str(tiny_dir), prompt_len=20, new_tokens=4, decode_tokens=6,
                      rounds=2, concurrency=(1, 3), transport_tokens=20)
    report = run_bench(cfg, json_out=str(tmp_path / "bench.json"), plot_out=str(tmp_path / "bench.png"))
    assert json.loads((tmp_path / "bench.json").read_text()).keys() == report.keys()
    assert {"floor", "single_stream", "transport", "concurrency", "modes", "speculative", "wand"} <= report.keys()
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert all(row["errors"] == 0 and row["requests_ok"] == row["concurrency"] for row in report["concurrency"])
    assert report["speculative"]["same_tokens_as_full"]
    assert 0 <= report["speculative"]["sampled"]["acceptance"] <= 1 and report["speculative"]["sampled"]["speedup"] > 0
    assert [w["stage"] for w in report["modes"]["workers"]] == [0, 1, 2, 3]
    assert all(w["rss_mib"] > 0 and w["parameters"] > 0 for w in report["modes"]["workers"])
    assert set(report["transport"]["us_per_token"]) == {
        "channels", "channels_plan_per_step", "plain", "plain_no_logits", "chained", "compiled"}
    assert report["transport"]["per_hop_us"] > 0
    single = report["single_stream"]  # interleaved rounds: every figure once per round, the ratio their median
    assert single["rounds"] == 2 and all(len(v) == 2 for side in ("poe_model_ms_per_token", "poe_cluster_ms_per_token")
                                         for v in single[side].values())
    low, high = single["cluster_over_model_full_spread"]
    assert low <= single["cluster_over_model_full"] <= high
    assert all(len(v) == 2 and min(v) > 0 for v in single["compute_ms_per_token"].values())
    assert all(len(v) == 2 for v in report["transport"]["us_per_token_spread"].values())
    layouts = report["layouts"]["layouts"]  # the default config's one worker, then one per stage
    assert list(layouts) == ["[0-3]", "[0][1][2][3]"]
    for lay in layouts.values():
        assert set(lay["over_model"]) == {"in process", "decode runs", "plan every step"}
        assert all(len(v) == 2 and min(v) > 0 for v in lay["ms_per_token"].values())
    prefix = report["prefix_cache"]  # the tiny context: a 208-token shared prefix
    assert prefix["same_tokens"] and prefix["off"]["hit_rate"] == 0 and prefix["hit_rate"] > 0.8
    assert prefix["on"]["cached_tokens"][1:] == [208] * 31 and sum(prefix["on"]["cache_blocks"]) > 0


def test_bench_rounds_and_decode_tokens_are_validated():
    for bad in (dict(rounds=0), dict(decode_tokens=1)):
        try:
            BenchConfig(checkpoint="x", trained="x", **bad)
        except ValueError as exc:
            assert "allowed: rounds >= 1, decode_tokens >= 2" in str(exc)
        else:
            raise AssertionError(f"{bad} must be refused")


def test_bench_sections_are_validated():
    try:
        BenchConfig(checkpoint="x", trained="x", sections=("floor", "warp"))
    except ValueError as exc:
        assert "'warp'" in str(exc) and all(s in str(exc) for s in SECTIONS)
    else:
        raise AssertionError("an unknown section must be refused")
