"""The command line, run as a user would: init-checkpoint, generate in every mode, calibrate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tools.cli import main


def test_init_checkpoint_writes_a_loadable_sharded_checkpoint(tmp_path, capsys):
    main(["init-checkpoint", str(tmp_path / "ck"), "--preset", "tiny", "--seed", "3", "--max-shard-mb", "0.5"])
    assert "wrote tiny checkpoint" in capsys.readouterr().out
    assert len(list((tmp_path / "ck").glob("model-*.safetensors"))) > 1
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["n_layer"] == 8


@pytest.mark.parametrize("flags", [
    ["--mode", "full"],
    ["--mode", "full", "--do-sample", "--seed", "1", "--top-k", "20", "--top-p", "0.9"],
    ["--mode", "prefix", "--max-stages", "2"],
    ["--mode", "stage", "--stage", "1"],
    ["--mode", "composition", "--stages", "0,3", "--stage-weights", "0.5,1"],
    ["--mode", "wand", "--p99-bounds", "0.5,0.5,0.5,0"],
    ["--mode", "speculative", "--k-draft", "2"],
])
def test_generate_prints_the_continuation_in_every_mode(tiny_dir, capsys, flags):
    main(["generate", "--checkpoint", str(tiny_dir), "--prompt", "hello", "--max-new-tokens", "5", *flags])
    out = capsys.readouterr()
    assert out.out.startswith("hello") and "5 tokens" in out.err
    if "wand" in flags:
        assert "stages_used: [" in out.err
    if "speculative" in flags:
        assert "acceptance:" in out.err


def test_generate_reports_bad_arguments_in_one_line(tiny_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--checkpoint", str(tiny_dir), "--prompt", "x", "--mode", "stage", "--stage", "9"])
    assert exit_info.value.code == 2
    assert "stage=9 is out of range" in capsys.readouterr().err


def test_calibrate_writes_bounds_the_loader_picks_up(tiny_dir, tmp_path):
    import shutil

    from stage_workers.config import load_config

    ck = tmp_path / "ck"
    shutil.copytree(tiny_dir, ck)
    text = tmp_path / "val.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    main(["calibrate", "--checkpoint", str(ck), "--text", str(text), "--window", "64"])
    bounds = load_config(ck).wand_p99_bounds
    assert len(bounds) == 4 and bounds[-1] == 0.0 and all(b >= 0 for b in bounds)


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "tools.cli", "--help"], capture_output=True, text=True, check=True)
    assert "init-checkpoint" in out.stdout and "generate" in out.stdout
