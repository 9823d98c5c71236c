"""How `poe-serve serve` ends on SIGTERM: drained, released and gone within --shutdown-timeout.

Two runs of the real command (each starts its own local Ray, ~20 s here): SIGTERM to the whole
process group, as systemd's default KillMode and `kill -- -PGID` send it, which kills Ray's own
processes under the server; and SIGTERM to the server alone with a request in flight, which
finishes while health says NOT_SERVING and new requests are refused. The watchdog that bounds the
exit is also checked without Ray, against a release and an exit handler that never return.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from tools.cli import main
from tools.client import PoEClient

ROOT = Path(__file__).resolve().parents[1]
MARGIN_S = 3.0  # interpreter exit, and the signal's delivery, on a loaded 2-core machine
STARTUP_S = 180
OWN_RAY = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a subprocess starts a local Ray of its own


def wait_until_gone(session_id: int, limit: float = 30.0) -> list[int]:
    """Processes of the session still alive after `limit` seconds. Ray's workers (in process
    groups of their own) end a few seconds after the raylet that started them."""
    deadline = time.monotonic() + limit
    while (left := session_processes(session_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def session_processes(session_id: int) -> list[int]:
    """Live processes in a session (the server started with start_new_session=True, and Ray's under it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session_id and "Z" not in Path(f"/proc/{entry}/stat").read_text().split()[2]:
                    pids.append(int(entry))
            except (OSError, IndexError):  # gone meanwhile
                pass
    return pids


class ServeProcess:
    """`poe-serve serve` in a session of its own; its output is collected as it comes. As a
    context manager it kills whatever of the session is left, so a failed test leaves no server."""

    def __init__(self, checkpoint: Path, shutdown_timeout: float, config: Path | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0",
             "--shutdown-timeout", str(shutdown_timeout)] + (["--config", str(config)] if config else []),
            cwd=ROOT, env=OWN_RAY, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.address: str | None = None
        self._serving = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._serving.wait(STARTUP_S):
            self.kill()
            pytest.fail("poe-serve serve did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            found = re.search(r"poe-serve: serving .* on (\S+) ", line)
            if found:
                self.address = found.group(1)
                self._serving.set()

    def exit_time(self, signalled: float, limit: float) -> float:
        """Seconds from `signalled` until the process exited; fails past `limit`."""
        try:
            self.proc.wait(timeout=limit + 30)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {limit + 30:.0f}s after SIGTERM:\n" + "".join(self.lines))
        return time.monotonic() - signalled

    def kill(self) -> None:
        for pid in session_processes(self.proc.pid):
            os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        self.proc.wait()

    @property
    def output(self) -> str:
        return "".join(self.lines)


def test_sigterm_to_the_whole_process_group_exits_within_the_shutdown_timeout(tiny_dir):
    timeout = 6.0
    with ServeProcess(tiny_dir, timeout) as serve:
        with PoEClient(serve.address, timeout=30) as client:
            assert client.health() == "SERVING"
        in_group = [p for p in session_processes(serve.proc.pid) if os.getpgid(p) == serve.proc.pid]
        assert len(in_group) > 1, "Ray's GCS and raylet share the server's process group: they get the SIGTERM too"
        signalled = time.monotonic()
        os.killpg(serve.proc.pid, signal.SIGTERM)  # kill -TERM -- -PGID
        took = serve.exit_time(signalled, timeout + MARGIN_S)
        print(f"\nSIGTERM to the process group: exited after {took:.1f}s (shutdown timeout {timeout:g}s)")
        assert took <= timeout + MARGIN_S and serve.proc.returncode == 0, serve.output
        assert wait_until_gone(serve.proc.pid) == [], "every Ray process ends too"


def test_sigterm_to_the_server_drains_the_request_in_flight_then_releases_ray(tiny_dir, tiny_model):
    timeout = 60.0  # room for the stream on a loaded machine; the exit comes as soon as it is done
    expected = tiny_model.generate([[4, 5, 6]], 16)[0, 3:].tolist()
    with ServeProcess(tiny_dir, timeout) as serve, PoEClient(serve.address, timeout=60) as client:
        stream = client.stream(token_ids=[4, 5, 6], max_new_tokens=16)
        chunks = [next(stream)]  # in flight
        signalled = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while client.health() != "NOT_SERVING":
            assert time.monotonic() < deadline, "health did not turn NOT_SERVING"
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as refused:
            client.generate(token_ids=[1, 2, 3], max_new_tokens=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        chunks += list(stream)
        assert [t for c in chunks for t in c.token_ids] == expected and chunks[-1].finish_reason == "length"
        took = serve.exit_time(signalled, timeout)
        print(f"\nSIGTERM to the server with a request in flight: drained and exited after {took:.1f}s")
        assert serve.proc.returncode == 0 and "poe-serve: stopped" in serve.output, serve.output
        assert "longer than --shutdown-timeout" not in serve.output, "Ray was released before the deadline"
        assert wait_until_gone(serve.proc.pid) == [], "Ray's processes were released"


def test_sigterm_to_a_server_on_torch_distributed_channels_exits_0(tiny_dir, tmp_path):
    config = tmp_path / "dist.yaml"
    config.write_text("transport: dist\n")
    with ServeProcess(tiny_dir, 30.0, config) as serve:
        with PoEClient(serve.address, timeout=60) as client:
            assert len(client.generate(token_ids=[4, 5, 6], max_new_tokens=4).token_ids) == 4
        serve.proc.send_signal(signal.SIGTERM)
        serve.exit_time(time.monotonic(), 30.0)
        assert serve.proc.returncode == 0 and "poe-serve: stopped" in serve.output, serve.output


EXIT_SCRIPT = """
import sys
from coordinator import PoEModel
from coordinator.serving_config import config_from_yaml_dict

model = PoEModel.on_ray(sys.argv[1], config=config_from_yaml_dict({"transport": sys.argv[2]}, "exit test"))
print(model.generate([[4, 5, 6]], 8)[0, 3:].tolist(), flush=True)
model.shutdown()
"""


@pytest.mark.parametrize("transport", ["shm", "dist"])  # auto is shm on one node
def test_a_script_exits_with_status_0_after_shutdown(tiny_dir, tiny_model, transport):
    """Full-greedy traffic leaves the result channels of stages 0-2 unused: shutdown() must end
    the threads waiting on them, or the interpreter aborts at exit."""
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(tiny_dir), transport], cwd=ROOT, env=OWN_RAY,
                          capture_output=True, text=True, timeout=STARTUP_S)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip() == str(tiny_model.generate([[4, 5, 6]], 8)[0, 3:].tolist())


WATCHDOG_SCRIPT = """
import atexit, sys, time
from coordinator.serving.shutdown import shut_down

class Server:
    def drain(self, deadline):
        return 0

if sys.argv[1] == "exit handler":
    atexit.register(time.sleep, 600)  # as Ray's own exit handler does while it looks for its GCS
print(time.time(), flush=True)  # imports done: the shutdown starts
shut_down(Server(), (lambda: time.sleep(600)) if sys.argv[1] == "release" else (lambda: None), 1.5)
"""


@pytest.mark.parametrize("hangs", ["release", "exit handler"])
def test_the_watchdog_ends_the_process_at_the_timeout_whatever_still_waits(hangs):
    done = subprocess.run([sys.executable, "-c", WATCHDOG_SCRIPT, hangs], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    took = time.time() - float(done.stdout)
    assert done.returncode == 0 and "longer than --shutdown-timeout 1.5s" in done.stderr, done.stderr
    assert 1.5 <= took < 1.5 + MARGIN_S


SIGNAL_SCRIPT = """
import signal, threading
from coordinator.serving.shutdown import wait_for_signal

def signal_from_another_thread():  # as when the kernel hands SIGTERM to one of gRPC's or Ray's threads
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

threading.Timer(0.5, signal_from_another_thread).start()
print(wait_for_signal(), flush=True)
"""


def test_a_sigterm_received_by_another_thread_still_ends_the_wait():
    done = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "SIGTERM", done.stderr


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_the_shutdown_timeout_must_be_positive_seconds(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--shutdown-timeout", value])
    assert exit_info.value.code == 2 and "--shutdown-timeout" in capsys.readouterr().err


SECOND_SIGNAL_SCRIPT = """
import os, signal, sys, threading, time
from coordinator.serving.shutdown import interruptible_startup, release_after_interrupt, wait_for_signal

def signal_soon(sig):
    threading.Timer(0.3, os.kill, (os.getpid(), sig)).start()

if sys.argv[1] == "draining":
    signal_soon(signal.SIGTERM)
    print(wait_for_signal(), flush=True)
    signal_soon(signal.SIGINT)
    time.sleep(60)  # a drain that would take long
else:
    signal_soon(signal.SIGINT)
    try:
        with interruptible_startup(50):
            time.sleep(60)  # a start that takes long (Ray, loading the workers)
    except KeyboardInterrupt:
        signal_soon(signal.SIGINT)
        release_after_interrupt(lambda: time.sleep(60))  # a release that hangs: the second Ctrl-C ends it
"""


@pytest.mark.parametrize("phase", ["starting", "draining"])
def test_a_second_signal_exits_at_once_saying_so(phase):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", SECOND_SIGNAL_SCRIPT, phase], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 130 and "second SIGINT: exiting at once" in done.stderr, done.stderr
    assert time.monotonic() - started < 15, "not the drain's or the release's minute"
    assert "Traceback" not in done.stderr
    if phase == "starting":
        assert "interrupted while starting" in done.stderr


def serve_command(*flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "tools.cli", "serve", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_busy_port_is_one_line_and_exit_2_before_anything_starts(tiny_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = serve_command("--checkpoint", str(tiny_dir), "--port", str(port))
    assert done.returncode == 2 and time.monotonic() - started < 20, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"poe-serve serve: error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "allowed: a free port, or 0 for any"]


def test_an_unreachable_ray_address_is_one_line_and_exit_2_within_seconds(tiny_dir):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        started = time.monotonic()
        done = serve_command("--checkpoint", str(tiny_dir), "--port", "0", "--address", f"127.0.0.1:{port}")
    assert done.returncode == 2 and time.monotonic() - started < 20, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"poe-serve serve: error: no Ray cluster answers at 127.0.0.1:{port}"), line


def test_ctrl_c_while_starting_releases_ray_and_exits_130_without_a_traceback(tiny_dir):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", "--checkpoint", str(tiny_dir), "--port", "0",
                             "--shutdown-timeout", "20"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(session_processes(proc.pid)) < 3:  # Ray's GCS and raylet are up: the start is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20 + 30)
        took = time.monotonic() - signalled
    finally:
        for pid in session_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 130 and took <= 20 + MARGIN_S, out
    assert "interrupted while starting" in out and "Traceback" not in out and "Segmentation" not in out, out
    assert wait_until_gone(proc.pid) == [], "Ray's processes were released"
