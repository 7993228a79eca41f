"""The CPU thread count chat chooses: from readings of /proc (fake ones here), at load and while decoding."""

from __future__ import annotations

import io
import os

import pytest
import torch

from chat.backends.base import BY_ENV, BY_OPTION, BackendInfo, cpu_threads
from chat.cli import parse_args
from chat.commands import handle
from chat.loading import load_session
from chat.local import describe_device
from chat.screen import Screen
from chat.threads import (
    ONE_PER_CPU,
    CpuTimes,
    ThreadTuner,
    busy_elsewhere,
    busy_ticks,
    choose_threads,
    own_ticks,
    read_cpu_times,
    threads_reason,
)

PROC_STAT = """\
cpu  300 10 100 5000 20 5 5 2 0 0
cpu0 100 0 50 2500 10 2 3 1 0 0
cpu1 200 10 50 2500 10 3 2 1 0 0
cpu2 7000 0 0 0 0 0 0 0 0 0
intr 1234 5 6 7
ctxt 555
"""


@pytest.fixture(autouse=True)
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("cpus", "busy", "threads"),
    [
        *[(2, busy, threads) for busy, threads in [(0, 2), (0.4, 2), (0.6, 1), (1, 1), (1.9, 1)]],
        *[(1, busy, 1) for busy in (0, 0.4, 0.6, 1, 1.9)],
        *[(8, busy, threads) for busy, threads in [(0, 8), (0.4, 8), (0.6, 7), (1, 7), (1.9, 6)]],
    ],
)
def test_one_thread_per_cpu_the_others_leave(cpus, busy, threads):
    assert choose_threads(cpus, busy) == threads


def test_the_reason_names_the_whole_cpus_busy():
    assert threads_reason(2, 0.4) == ONE_PER_CPU
    assert threads_reason(2, 0.6) == "1 of 2 CPUs busy with other programs"
    assert threads_reason(2, 1.9) == "2 of 2 CPUs busy with other programs"
    assert threads_reason(1, 3.0) == "1 of 1 CPU busy with other programs"


def test_proc_readings_are_parsed_for_the_cpus_asked():
    # user + nice + system + irq + softirq + steal; the all-CPU line and other CPUs are left out
    assert busy_ticks(PROC_STAT, {0, 1}) == 156 + 266
    assert busy_ticks(PROC_STAT, {1}) == 266
    # The name may hold spaces and parentheses; utime and stime come 11 and 12 fields after it.
    assert own_ticks("4321 (a (b) c) R 1 1 1 0 -1 4194304 99 0 0 0 55 45 0 0 20 0 3 0 26601") == 100


def test_others_busy_is_all_non_idle_time_less_our_own():
    before, after = CpuTimes(busy=10.0, ours=2.0), CpuTimes(busy=12.5, ours=3.0)
    assert busy_elsewhere(before, after, elapsed=1.5) == pytest.approx(1.0)
    assert busy_elsewhere(after, CpuTimes(busy=12.5, ours=3.5), elapsed=1.0) == 0.0  # ticks round apart


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux's /proc")
def test_this_machine_reads():
    times = read_cpu_times(os.sched_getaffinity(0))
    assert times is not None and times.busy > 0 and times.ours > 0


class Machine:
    """A fake clock and /proc: this process keeps one CPU busy, a neighbour `neighbour` CPUs."""

    def __init__(self):
        self.now, self.ours, self.others, self.neighbour, self.reads = 1000.0, 0.0, 0.0, 0.0, 0

    def clock(self) -> float:
        return self.now

    def read(self, cpus) -> CpuTimes:
        self.reads += 1
        return CpuTimes(busy=self.ours + self.others, ours=self.ours)

    def decode(self, tuner: ThreadTuner, steps: int, seconds: float = 0.05) -> None:
        for _ in range(steps):
            tuner.step()
            self.now += seconds
            self.ours += seconds
            self.others += self.neighbour * seconds


def tuner_on(machine: Machine, reason: str = ONE_PER_CPU, device: str = "cpu") -> ThreadTuner:
    info = BackendInfo("torchscript", "m", "m", device, "float32", 64, threads=2, threads_reason=reason)
    return ThreadTuner(info, cpus={0, 1}, read=machine.read, clock=machine.clock)


def test_the_tuner_follows_a_neighbour_that_comes_and_goes():
    machine = Machine()
    tuner = tuner_on(machine)
    machine.decode(tuner, 20)
    assert tuner.info.threads == 2 and machine.reads >= 2
    machine.neighbour = 1.0
    machine.decode(tuner, 20)
    assert tuner.info.threads == 1 and torch.get_num_threads() == 1
    assert tuner.info.threads_reason == "1 of 2 CPUs busy with other programs"
    machine.neighbour = 0.0
    machine.decode(tuner, 20)
    assert tuner.info.threads == 2 and torch.get_num_threads() == 2 and tuner.info.threads_reason == ONE_PER_CPU


def test_a_slow_step_reads_at_once():
    machine = Machine()
    tuner = tuner_on(machine)
    reads = machine.reads
    while machine.reads == reads:  # up to a reading
        machine.decode(tuner, 1)
    machine.decode(tuner, 1)
    machine.neighbour = 1.0
    machine.decode(tuner, 1, seconds=0.3)  # 0.4 s since the reading: not yet due by the clock
    tuner.step()
    assert tuner.info.threads == 1


def test_a_neighbour_there_while_the_person_typed_is_acted_on_at_the_next_reply():
    machine = Machine()
    tuner = tuner_on(machine)
    machine.decode(tuner, 20)
    machine.neighbour = 1.0
    machine.now += 60  # between replies: the tuner is not called, the neighbour keeps its CPU busy
    machine.others += 60
    machine.decode(tuner, 1)
    assert tuner.info.threads == 1


@pytest.mark.parametrize(("reason", "device"), [(BY_OPTION, "cpu"), (BY_ENV, "cpu"), (ONE_PER_CPU, "cuda:0")])
def test_the_tuner_leaves_a_fixed_count_and_gpus_alone(reason, device):
    machine = Machine()
    machine.neighbour = 1.0
    tuner = tuner_on(machine, reason, device)
    machine.decode(tuner, 50)
    assert machine.reads == 0 and tuner.info.threads == 2 and tuner.info.threads_reason == reason


def test_describe_device_says_why():
    info = BackendInfo("torchscript", "m", "m", "cpu", "bfloat16", 64, threads=2, threads_reason=BY_OPTION)
    assert describe_device(info) == "cpu, bfloat16, 2 threads (--threads)"
    info.device = "cuda:0"
    assert describe_device(info) == "cuda:0, bfloat16"


class LoadClock:
    """Time as chat.threads sees it at load: 0.2 s pass between two looks at the clock, a sleep takes none."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 0.2
        return self.now

    def sleep(self, seconds: float) -> None:
        pass


def neighbour_on_one_of_two_cpus(monkeypatch) -> None:
    """Readings at load as if another program kept one of two CPUs busy the whole time."""
    clock = LoadClock()
    monkeypatch.setattr("chat.threads.time", clock)
    monkeypatch.setattr("chat.threads.allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr("chat.threads.read_cpu_times", lambda cpus: CpuTimes(busy=clock.now, ours=0.0))


@pytest.mark.parametrize(
    ("setup", "threads"),
    [
        ("neighbour", "1 thread (1 of 2 CPUs busy with other programs)"),
        ("omp", "1 thread (OMP_NUM_THREADS)"),
        ("quiet", None),  # no reading (see conftest): one per CPU
    ],
)
def test_status_names_the_thread_count_and_why(llama_artifact, monkeypatch, setup, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if setup != "quiet":
        neighbour_on_one_of_two_cpus(monkeypatch)
    if setup == "omp":  # it wins over the reading
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if threads is None:
        count = cpu_threads()
        threads = f"{count} thread{'s' if count != 1 else ''} ({ONE_PER_CPU})"
    session = load_session(parse_args([str(llama_artifact)]), keep=False)
    session.screen = Screen(io.StringIO(), io.StringIO())
    handle(session, "!status")
    device = next(line for line in session.screen.out.getvalue().splitlines() if line.startswith("device"))
    assert device.startswith("device      cpu, float32, ") and device.endswith(f", {threads}")
    assert session.engine.info.threads == torch.get_num_threads() == int(threads.split()[0])
