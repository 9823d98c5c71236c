"""Checkpoint loading: config aliases, shards, prefixes, dtypes, per-slice reads, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints.writer import init_checkpoint, preset_config
from stage_workers.checkpoint import CheckpointReader
from stage_workers.config import config_from_dict, load_config
from stage_workers.worker import StageWorker, WorkerSpec


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_weights(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_full_size_preset_has_the_cards_parameter_count():
    assert preset_config("1.5b").num_parameters() == 1_507_591_082
    assert preset_config("1.5b").stage_boundaries == (11, 16, 20, 23)


def test_hf_aliases_and_unknown_keys_are_accepted():
    config = config_from_dict({
        "vocab_size": 512, "num_hidden_layers": 8, "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "poe_stage_layout": [4, 2, 1, 1],
        "architectures": ["PoEForCausalLM"], "torch_dtype": "bfloat16",
    })
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head, config.sequence_len) == (8, 64, 4, 2, 256)


def test_short_window_follows_the_formula_unless_configured():
    config = preset_config("1.5b")
    assert config.resolved_short_window == 512  # ceil(2048/4/128)*128
    assert config.layer_windows[:4] == (512, 512, 512, 2048) and config.layer_windows[-1] == 2048
    assert preset_config("tiny", short_window=16).layer_windows[0] == 16


@pytest.mark.parametrize("key", ["vocab_size", "poe_stage_layout", "n_embd"])
def test_missing_required_config_key_is_named(key):
    raw = {"vocab_size": 512, "n_layer": 8, "n_embd": 64, "n_head": 4, "sequence_len": 256, "poe_stage_layout": [4, 2, 1, 1]}
    del raw[key]
    with pytest.raises(ValueError, match=key):
        config_from_dict(raw)


def test_bad_config_values_are_explained():
    raw = {"vocab_size": 512, "n_layer": 8, "n_embd": 64, "n_head": 4, "sequence_len": 256}
    with pytest.raises(ValueError, match="poe_stage_layout.*sum to n_layer=8"):
        config_from_dict({**raw, "poe_stage_layout": [4, 2, 1]})
    with pytest.raises(ValueError, match="n_kv_head.*divide"):
        config_from_dict({**raw, "poe_stage_layout": [4, 2, 1, 1], "n_kv_head": 3})


@pytest.mark.parametrize("variant", ["wide", "bf16"])
def test_sharded_prefixed_and_bf16_checkpoints_load(checkpoint_dirs, variant):
    directory = checkpoint_dirs(variant)
    config = load_config(directory)
    with CheckpointReader(directory, config) as reader:
        assert reader.read("lm_head.weight").shape == (config.vocab_size, config.n_embd)
    if variant == "wide":
        assert reader.prefix == "model."
        assert len(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]) > 10


def test_fp16_checkpoint_serves_the_same_tokens_as_fp32(tmp_path):
    a = init_checkpoint(tmp_path / "a", "tiny", seed=5, dtype="fp16")
    from coordinator import PoEModel

    model = PoEModel.from_pretrained(a)
    assert model.generate([1, 2, 3], 4).shape == (1, 7)


def test_each_stage_worker_reads_only_its_slice(tiny_dir, monkeypatch):
    read = []
    original = CheckpointReader.read
    monkeypatch.setattr(CheckpointReader, "read", lambda self, name: read.append(name) or original(self, name))
    StageWorker.from_checkpoint(tiny_dir, WorkerSpec(stage=2))  # tiny: stage 2 is layer 6 alone
    layers = {name.split(".")[2] for name in read if name.startswith("transformer.h.")}
    assert layers == {"6"}
    assert "transformer.wte.weight" not in read and "lm_head_stages.1.weight" not in read
    assert {"lm_head.weight", "lm_head_stages.2.weight"} <= set(read)


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    directory = copy_checkpoint(tiny_dir, tmp_path / "c")
    edit_weights(directory, lambda t: t.pop("transformer.h.3.mlp.c_fc.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'transformer\.h\.3\.mlp\.c_fc\.weight'"):
        StageWorker.from_checkpoint(directory, WorkerSpec(stage=0))


def test_unexpected_tensor_is_named(tiny_dir, tmp_path):
    directory = copy_checkpoint(tiny_dir, tmp_path / "c")
    edit_weights(directory, lambda t: t.update({"transformer.h.99.attn.c_q.weight": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'transformer\.h\.99"):
        StageWorker.from_checkpoint(directory, WorkerSpec(stage=1))


def test_misshaped_tensor_is_named_with_both_shapes(tiny_dir, tmp_path):
    directory = copy_checkpoint(tiny_dir, tmp_path / "c")
    edit_weights(directory, lambda t: t.update({"lm_head_stages.1.weight": torch.zeros(512, 63)}))
    with pytest.raises(ValueError, match=r"lm_head_stages\.1\.weight.*\[512, 63\].*expected \[512, 64\]"):
        StageWorker.from_checkpoint(directory, WorkerSpec(stage=0))


def test_nan_in_a_head_fails_at_load(tiny_dir, tmp_path):
    directory = copy_checkpoint(tiny_dir, tmp_path / "c")

    def poison(t):
        t["lm_head_stages.3.weight"][7, 7] = float("nan")

    edit_weights(directory, poison)
    StageWorker.from_checkpoint(directory, WorkerSpec(stage=0))  # stage 0 never reads that head
    with pytest.raises(ValueError, match=r"lm_head_stages\.3\.weight.*NaN"):
        StageWorker.from_checkpoint(directory, WorkerSpec(stage=3))


def test_integer_tensor_dtype_is_refused(tiny_dir, tmp_path):
    directory = copy_checkpoint(tiny_dir, tmp_path / "c")
    edit_weights(directory, lambda t: t.update({"smear_lambda": torch.ones(1, dtype=torch.int32)}))
    with pytest.raises(ValueError, match="smear_lambda.*dtype I32"):
        StageWorker.from_checkpoint(directory, WorkerSpec(stage=0))


def test_truncated_shard_fails_with_the_file_named(checkpoint_dirs, tmp_path):
    directory = copy_checkpoint(checkpoint_dirs("wide"), tmp_path / "c")
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=shard.name):
        StageWorker.from_checkpoint(directory, WorkerSpec(stage=0))


def test_nanochat_padded_vocab_rows_are_cropped(tmp_path):
    directory = init_checkpoint(tmp_path / "p", "tiny", seed=1, vocab_size=500)  # pads to 512 rows below
    edit_weights(directory, lambda t: t.update({
        n: torch.cat([v, torch.zeros(12, v.shape[1])]) for n, v in list(t.items())
        if n in ("transformer.wte.weight", "lm_head.weight")
    }))
    worker = StageWorker.from_checkpoint(directory, WorkerSpec(stage=0))
    assert worker.slice.embedding.wte.shape[0] == 500
