"""The runner's waits on its neighbours: the coordinator's next plan may arrive while a worker
still finishes a step (the coordinator waits only for decisions), and must not end that step;
a plan that aborts the step must."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from fakes import FakeWorker

from stage_workers.channels import ShmChannel
from stage_workers.framing import Interrupted
from stage_workers.messages import StepPlan
from stage_workers.step_runner import StageRunner


def channel_pair(tag: str):
    name = f"test-{tag}-{uuid.uuid4().hex[:8]}"
    reader = ShmChannel.create(name, 1 << 16, 4)
    return reader, ShmChannel.attach(name, 1 << 16, 4)


@pytest.fixture
def runner():
    control, coordinator = channel_pair("ctl")
    data_in, upstream = channel_pair("data")
    r = StageRunner(FakeWorker(1, 4), worker_id=1, num_stages=4).neighbours
    r.control = control
    yield r, coordinator, data_in, upstream
    for channel in (coordinator, control, upstream, data_in):
        channel.close()


def test_the_next_plan_arriving_mid_step_is_kept_and_the_step_goes_on(runner):
    r, coordinator, data_in, upstream = runner
    coordinator.send(StepPlan(8, 0), 8, 0)  # the next step's plan, while step 7 waits for its data
    later = threading.Timer(0.5, lambda: upstream.send(StepPlan(0, 0), 7, 0))
    later.start()
    cpu = time.thread_time()
    envelope = r.unless_aborted(lambda: data_in.recv(time.monotonic() + 5, interrupt=r.control), step=7)
    cpu = time.thread_time() - cpu
    later.join()
    assert envelope.step == 7, "the data of the running step arrived"
    assert [m.step for m in r.backlog] == [8], "the plan is kept for after the step"
    assert cpu < 0.25, f"the wait slept after keeping the plan, not spun on its wake-up ({cpu:.2f}s of CPU in 0.5s)"


def test_a_plan_that_aborts_the_running_step_ends_its_wait(runner):
    r, coordinator, data_in, _ = runner
    coordinator.send(StepPlan(8, 0), 8, 0)
    coordinator.send(StepPlan(9, 1, aborted=(7,)), 9, 1)
    started = time.monotonic()
    with pytest.raises(Interrupted):
        r.unless_aborted(lambda: data_in.recv(time.monotonic() + 5, interrupt=r.control), step=7)
    assert time.monotonic() - started < 2
    assert [m.step for m in r.backlog] == [8, 9], "both plans run next, the abort first undoing step 7"
