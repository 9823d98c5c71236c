"""Shared fixtures: random checkpoints written once per session, models and tokenizers loaded
from them, test certificates and the session's Ray instance. Plain helpers are in support.py.

Checkpoints are made by the project's writer with the `tiny` preset and overrides, so every
variant (layout, heads, dtype, name prefix, shards, short windows) runs the real loading code.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from hypothesis import settings

from checkpoints.writer import init_checkpoint

# CI replays the same generated requests every run (a red CI blocks a landing); a local run
# explores new ones each time.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# The tests' own torch work (oracles, expected tokens) runs on the main thread with one thread, so
# it never owns an OpenMP team that would slow the engine loop's thread (stage_workers/compute_thread.py)
torch.set_num_threads(1)

# name -> init_checkpoint keyword arguments
VARIANTS = {
    # the default: tiny preset, fp32, short window 16 so 40-token prompts cross it
    "tiny": dict(seed=0, short_window=16),
    # another layout and head count, GQA 3:1, HF-free canonical keys, model. prefix, sharded
    "wide": dict(seed=1, n_layer=6, poe_stage_layout=[3, 1, 1, 1], n_embd=96, n_head=6, n_kv_head=2,
                 short_window=24, window_pattern="SL", name_prefix="model.", max_shard_bytes=120_000),
    # no GQA, poe_alpha != 0, three stages
    "alpha": dict(seed=2, n_layer=5, poe_stage_layout=[2, 2, 1], n_head=2, n_kv_head=2, poe_alpha=0.5,
                  short_window=12),
    # stored in bf16 (served in fp32 by default)
    "bf16": dict(seed=3, dtype="bf16", short_window=16),
}


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = init_checkpoint(root / name, "tiny", **VARIANTS[name])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_dir(checkpoint_dirs):
    return checkpoint_dirs("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from coordinator import PoEModel

    return PoEModel.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def checkpoint(tiny_dir):
    """The checkpoint a module's `tokenizer` and `reference` load: the tiny one, unless the module
    overrides this fixture."""
    return tiny_dir


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from coordinator import load_tokenizer

    return load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """An in-process model of the module's own, the reference served replies are compared with."""
    from coordinator import PoEModel

    model = PoEModel.from_pretrained(checkpoint)
    yield model
    model.shutdown()


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate signed by the
    same CA, made with the `openssl` command line: ca.pem, server.pem/.key, client.pem/.key."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command line is needed to make test certificates (apt install openssl)")
    d = tmp_path_factory.mktemp("certs")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=poe-serve test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session; clusters join it and leave it running."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(items):
    """Tests marked before_session_ray run first, before a test starts the session's Ray: they start
    Ray heads of their own on Ray's default ports, which that one would hold."""
    items.sort(key=lambda item: item.get_closest_marker("before_session_ray") is None)
