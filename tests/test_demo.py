"""`poe-serve demo`, the README's main command: Ray, gRPC and one real call per mode, as a table."""

from __future__ import annotations

from tools.cli import main


def test_demo_prints_every_mode_with_stages_used_and_acceptance(ray_session, capsys):
    main(["demo", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    for mode in ("full", "full, sampled", "prefix", "stage 0 alone", "composition", "wand", "speculative"):
        assert f"| {mode}" in out, f"no row for {mode}:\n{out}"
    wand_row = next(line for line in out.splitlines() if line.startswith("| wand"))
    assert wand_row.split("|")[3].strip().isdigit(), f"WAND's stages_used are missing: {wand_row}"
    assert "accept " in out and "4 Ray workers" in out and "done in" in out
