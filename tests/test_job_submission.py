"""`poe-serve serve` as a Ray job, for real: `ray job submit` against a head this test starts.

The head (`ray start --head --block`) lives in its own temp dir, on free ports, with its own
auth token; the job joins it through RAY_ADDRESS, answers Generate with the in-process model's
tokens, and stops cleanly on `ray job stop`. This test does not know the engine or the modes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest
import torch
from ray.job_submission import JobStatus, JobSubmissionClient

from coordinator.serving_config import load_serving_config
from tools.client import PoEClient

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # `ray` and `poe-serve` of the Python running the tests
EXCLUDES = [".git", "checkpoints/default", "benchmarks"]  # the trained model is rewritten by `poe-serve train`
STARTUP_TIMEOUT_S = 180
STOP_TIMEOUT_S = 120
NEW_TOKENS = 5


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class RayHead:
    """A `ray start --head --block` process: stopping it (SIGTERM) stops exactly its own processes.
    `ray stop` would kill every Ray process on the machine, the test session's own included."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="poejob-", dir="/tmp")  # unix socket paths must stay short
        gcs, dashboard, agent, client_server = free_ports(4)
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        self.token = secrets.token_hex(32)
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,  # this head's own; ~/.ray is left alone
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # nothing to drain; stop at once
            "RAY_JOB_STOP_WAIT_TIME_S": "60",  # SIGTERM to SIGKILL: 3 s by default, short on a loaded machine
        }
        self.log = Path(self.temp_dir) / "ray-start.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [BIN / "ray", "start", "--head", "--block", "--num-cpus", "4", "--disable-usage-stats",
                 "--temp-dir", self.temp_dir, "--port", str(gcs), "--include-dashboard", "true",
                 "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(agent),
                 "--ray-client-server-port", str(client_server)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.jobs: JobSubmissionClient | None = None

    def wait_for_dashboard(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while self.jobs is None:
            assert self.process.poll() is None, f"ray start exited:\n{self.log.read_text()}"
            try:
                self.jobs = JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {self.token}"})
            except (ConnectionError, RuntimeError):
                assert time.monotonic() < deadline, f"no dashboard after {STARTUP_TIMEOUT_S}s:\n{self.log.read_text()}"
                time.sleep(1)

    def ray(self, *args: str, timeout: float = 120) -> str:
        """Run the `ray` CLI against this head; returns stdout."""
        done = subprocess.run([BIN / "ray", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def stop(self) -> None:
        try:
            for job in self.jobs.list_jobs() if self.jobs else []:  # left running by a failed test
                if not job.status.is_terminal():
                    self.jobs.stop_job(job.submission_id)
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
            shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_head():
    head = RayHead()
    try:
        head.wait_for_dashboard()
        yield head
    finally:
        head.stop()


def wait_until_serving(head: RayHead, job_id: str, address: str) -> None:
    """Until the job's server reports SERVING; fails with the job's logs if the job ends or time runs out."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with PoEClient(address, timeout=5) as client:
        while True:
            status = head.jobs.get_job_status(job_id)
            assert not status.is_terminal(), f"job {job_id} ended {status}:\n{head.jobs.get_job_logs(job_id)}"
            try:
                if client.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, (
                f"job {job_id} not serving after {STARTUP_TIMEOUT_S}s ({status}):\n{head.jobs.get_job_logs(job_id)}")
            time.sleep(1)


def test_ray_job_submit_serves_generate_and_stops(ray_head, tiny_dir, tiny_model):
    job_id = f"poe-serve-{secrets.token_hex(4)}"
    address = f"127.0.0.1:{free_ports(1)[0]}"
    ray_head.ray("job", "submit", "--address", ray_head.dashboard, "--submission-id", job_id,
                 "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--no-wait",
                 "--", "poe-serve", "serve", "--checkpoint", str(tiny_dir), "--port", address.rsplit(":", 1)[1])
    wait_until_serving(ray_head, job_id, address)

    ids = torch.randint(0, 500, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    with PoEClient(address, timeout=120) as client:
        reply = client.generate(token_ids=ids, max_new_tokens=NEW_TOKENS)
    expected = tiny_model.generate(torch.tensor([ids]), NEW_TOKENS)[0, len(ids):].tolist()
    assert list(reply.token_ids) == expected

    # joined the head's cluster through RAY_ADDRESS: its stage workers are this job's actors there
    actors = json.loads(ray_head.ray("list", "actors", "--address", ray_head.dashboard, "--format", "json",
                                     "--filter", "class_name=StageActor", "--filter", "state=ALIVE"))
    driver_job = ray_head.jobs.get_job_info(job_id).job_id
    workers = len(load_serving_config().worker_groups(tiny_model.config.num_stages))  # the default config's
    assert {a["job_id"] for a in actors} == {driver_job} and len(actors) == workers, actors

    ray_head.ray("job", "stop", "--address", ray_head.dashboard, job_id, timeout=STOP_TIMEOUT_S)
    logs = ray_head.jobs.get_job_logs(job_id)
    assert ray_head.jobs.get_job_status(job_id) == JobStatus.STOPPED, logs
    assert "poe-serve: stopped" in logs, f"the server did not shut down cleanly:\n{logs}"


def docs_block(page: Path, marker: str) -> str:
    """The fenced block right after the `<!-- tested: ... -->` marker line on a docs page."""
    text = page.read_text()
    after = text[text.index(f"<!-- tested: {marker}"):]
    start = after.index("```bash\n") + len("```bash\n")
    return after[start : after.index("\n```", start)]


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.before_session_ray  # the block's head needs Ray's default ports, which the session's Ray would hold
def test_the_docs_ray_job_block_works_as_pasted_twice_in_a_row(tmp_path):
    """docs/serving.md's block in a fresh home directory (no ~/.ray/auth_token yet), then again:
    token auth, readiness, a new submission id, and stopping its own head only."""
    block = docs_block(REPO / "docs" / "serving.md", "the Ray job block")
    busy = [port for port in (6379, 8265, 52365, 50051) if port_in_use(port)]
    if busy:
        pytest.skip(f"the block uses Ray's and poe-serve's default ports, and {busy} are in use on this machine")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env |= {"HOME": str(tmp_path), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for run in (1, 2):
        shell = subprocess.Popen(["bash", "-e", "-c", block], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = shell.communicate(timeout=STARTUP_TIMEOUT_S + 2 * STOP_TIMEOUT_S)
        finally:  # a failed run leaves its head running: end what is left of the shell's own session
            subprocess.run(["pkill", "-KILL", "-s", str(shell.pid)], check=False)
        shown = f"run {run}:\n{out[-3000:]}\n{err[-3000:]}"
        assert shell.returncode == 0, shown
        assert "SERVING" in out and "16 tokens" in err and "poe-serve: serving" in out, shown
    assert (tmp_path / ".ray" / "auth_token").is_file(), "the first run made the token the second one used"
    assert not any(port_in_use(p) for p in (8265, 52365, 50051)), "the block stopped its head and the server"
