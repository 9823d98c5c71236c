"""tools/soak.py (scripts/soak.sh) for a few seconds on the session's Ray: traffic through gRPC and
HTTP in every mode while a stage worker is killed, every answer checked against the in-process
model. The soak itself is a script for long runs; here it must run, inject its faults, and
report what it served."""

from __future__ import annotations

from tools.soak import JOBS, run_soak


def test_a_short_soak_serves_every_surface_through_a_worker_kill_with_no_wrong_answer(ray_session, tiny_dir):
    report = run_soak(tiny_dir, duration=14, concurrency=2, fault_every=5, nodes=0, transport="auto", config=None,
                      seed=1)
    print(f"\nsoak: {report}")
    assert report["faults"].get("worker killed", 0) >= 1, report
    assert report["wrong"] == 0 and report["served_grpc"] >= 1 and report["served_http"] >= 1, report
    assert report["requests"] == report["served"] + report["failed"] and report["latency_s"]["p99"] > 0
    assert {mode for mode, _, _ in JOBS} == {"full", "prefix", "stage", "composition", "wand", "speculative"}
