"""The command line, run as a user would: init-checkpoint, generate in every mode, calibrate."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

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


def test_calibrate_writes_the_models_bounds_and_the_loader_picks_them_up(tiny_dir, tiny_model, tokenizer, tmp_path):
    """The bounds written are `PoEModel.calibrate_wand` over the text in 64-token chunks, each
    opened with BOS, at the default quantile."""
    import shutil

    from stage_workers.config import load_config

    ck = tmp_path / "ck"
    shutil.copytree(tiny_dir, ck)
    text = tmp_path / "val.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    main(["calibrate", "--checkpoint", str(ck), "--text", str(text), "--window", "64"])
    ids = tokenizer.encode(text.read_text())
    assert ids[0] == tokenizer.bos_token_id
    chunks = [[tokenizer.bos_token_id] + ids[i : i + 63] for i in range(1, len(ids), 63)]
    assert 1 < len(chunks) <= 64 and all(len(c) > 1 for c in chunks), "every chunk is calibrated on"
    expected = tiny_model.calibrate_wand(chunks, quantile=0.99)
    bounds = load_config(ck).wand_p99_bounds
    assert bounds == pytest.approx(expected, abs=1e-6) and bounds[-1] == 0.0
    assert min(bounds[:-1]) > 0, "positive bounds: the comparison is not of zeros"


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "tools.cli", "--help"], capture_output=True, text=True, check=True)
    assert "init-checkpoint" in out.stdout and "generate" in out.stdout


@pytest.fixture(scope="module")
def grpc_address(tiny_dir):
    """A gRPC server over an in-process model of the tiny checkpoint: the CLI's --server side."""
    from coordinator import PoEModel, load_tokenizer
    from coordinator.grpc_api.server import Server

    with PoEModel.from_pretrained(tiny_dir) as model:
        server = Server(model, load_tokenizer(tiny_dir), port=0)
        yield server.address
        server.stop(grace=0)


def run_generate(capsys, where: str, tiny_dir, address: str, *flags: str) -> tuple[int, str, str]:
    target = ["--server", address] if where == "server" else ["--checkpoint", str(tiny_dir)]
    try:
        main(["generate", "--prompt", "hello", *target, *flags])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out = capsys.readouterr()
    return code, out.out, out.err


BAD_FLAGS = [
    (["--max-new-tokens", "0"], "argument --max-new-tokens: '0' is invalid; allowed: an integer >= 1"),
    (["--mode", "stage"], "stage: required by mode stage"),
    (["--mode", "prefix"], "max_stages: required by mode prefix"),
    (["--temperature", "0.7"], "temperature=0.7 is set but sampling is off; allowed: --do-sample"),
    (["--seed", "3"], "seed=3 is set but sampling is off"),
    (["--mode", "stage", "--stage", "1", "--k-draft", "2"], "k_draft is not an argument of mode stage"),
    (["--mode", "wand", "--do-sample"], "--do-sample: mode wand is greedy by definition"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
]


@pytest.mark.parametrize("where", ["local", "server"])
@pytest.mark.parametrize("flags, error", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_the_same_one_line_error_with_and_without_a_server(where, flags, error, tiny_dir,
                                                                         grpc_address, capsys):
    code, _, err = run_generate(capsys, where, tiny_dir, grpc_address, *flags)
    assert code == 2 and error in err, err


@pytest.mark.parametrize("flags", [
    ["--mode", "stage", "--stage", "1"],
    ["--mode", "composition", "--stages", "0,3", "--stage-weights", "0.5,1"],
    ["--do-sample", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"],
    ["--mode", "wand", "--safety", "0.5"],
])
def test_a_flag_gives_the_same_tokens_with_and_without_a_server(flags, tiny_dir, grpc_address, capsys):
    local = run_generate(capsys, "local", tiny_dir, grpc_address, "--max-new-tokens", "6", *flags)
    remote = run_generate(capsys, "server", tiny_dir, grpc_address, "--max-new-tokens", "6", *flags)
    assert local[0] == remote[0] == 0 and local[1] == remote[1], (local, remote)
    statistics = [[line for line in r[2].splitlines() if line.startswith("stages_used")] for r in (local, remote)]
    assert statistics[0] == statistics[1], statistics


def test_score_info_and_health_through_a_server(grpc_address, tiny_model, tokenizer, capsys):
    main(["health", "--server", grpc_address])
    assert capsys.readouterr().out.strip() == "SERVING"
    main(["info", "--server", grpc_address])
    info = json.loads(capsys.readouterr().out)
    assert len(info["stageLayout"]) == tiny_model.config.num_stages
    main(["score", "--server", grpc_address, "--text", "hello world"])
    scored = json.loads(capsys.readouterr().out)
    ids = tokenizer.encode("hello world")
    expected = tiny_model.forward(torch.tensor([ids]))[0, :-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert scored["token_logprobs"] == pytest.approx(expected.tolist(), abs=1e-4)


def test_health_wait_gives_up_on_a_server_that_never_listens(capsys):
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(SystemExit) as exit_info:
            main(["health", "--server", address, "--wait", "2"])
    assert exit_info.value.code == 2 and 2 <= time.monotonic() - started < 10
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_version_and_help_texts(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"poe-serve {version('poe-serve')}"
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert "HTTP" in help_text and "(default: 50051)" in help_text and "second Ctrl-C" in help_text
