"""`poe-serve demo`, the README's main command: Ray, gRPC and one real call per mode, as a table."""

from __future__ import annotations

from coordinator.core.modes import MODES
from tools.cli import main


def test_demo_prints_every_mode_with_stages_used_and_acceptance(ray_session, capsys):
    main(["demo", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    for mode in (*MODES, "full, sampled", "full, JSON schema", "speculative, sampled"):
        assert f"| {mode}" in out, f"no row for {mode}:\n{out}"
    wand_row = next(line for line in out.splitlines() if line.startswith("| wand"))
    stages_used = wand_row.split("|")[3].split()
    assert len(stages_used) == 6 and all(s.isdigit() for s in stages_used), f"WAND's stages_used: {wand_row}"
    assert "accept " in out and "served by 1 Ray worker" in out and "done in" in out
