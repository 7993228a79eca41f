"""How many CPU threads torch should run when chat chooses: one per CPU, less the CPUs other programs keep busy.

OpenMP threads meet at a barrier after every parallel step, so one thread that shares its CPU with another
program holds all the others up: on 2 CPUs with one kept busy, 2 threads decode several times slower than 1.
Linux's /proc tells how busy each CPU is and how much of that is this process; elsewhere nothing is read and
the count stays one per CPU. The count is read once while the model loads (StartingThreads) and then
followed while replies decode (ThreadTuner). A count the user fixed (--threads, OMP_NUM_THREADS) is left.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chat.backends.base import BY_ENV, BY_OPTION, cpu_threads, fixed_threads

if TYPE_CHECKING:
    from chat.backends.base import BackendInfo, LoadOptions

ONE_PER_CPU = "one per CPU"
START_WINDOW_S = 0.15  # the load's reading spans at least this: over less, 10 ms clock ticks blur it
EVERY_S = 0.5  # while decoding, a new reading this often
SHORTEST_S = 0.1  # no reading over less, even after a slow step
SLOW_STEP = 4  # a step this many times the quickest recent one reads the CPUs at once


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds since boot: every program's non-idle time on some CPUs, and this process's own (all threads)."""

    busy: float
    ours: float


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on; empty where the system does not say (macOS, Windows)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()


def busy_ticks(proc_stat: str, cpus: Collection[int]) -> int:
    """Non-idle clock ticks of `cpus` from the per-CPU lines of /proc/stat: user, nice, system, irq, softirq and
    steal (a hypervisor's other guests; a thread there waits as for a busy neighbour). Guest time is in user."""
    ticks = 0
    for line in proc_stat.splitlines():
        name, _, values = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            fields = [int(value) for value in values.split()]
            ticks += sum(fields[:3]) + sum(fields[5:8])
    return ticks


def own_ticks(self_stat: str) -> int:
    """utime + stime of /proc/self/stat: this process's clock ticks, all threads (after the name, which may
    hold spaces and parentheses, they are the 12th and 13th fields)."""
    fields = self_stat.rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def read_cpu_times(cpus: Collection[int]) -> CpuTimes | None:
    """Now's CpuTimes for `cpus`; None without /proc."""
    try:
        with open("/proc/stat") as stat, open("/proc/self/stat") as own:
            busy, ours = busy_ticks(stat.read(), cpus), own_ticks(own.read())
        hertz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return CpuTimes(busy=busy / hertz, ours=ours / hertz)


def busy_elsewhere(before: CpuTimes, after: CpuTimes, elapsed: float) -> float:
    """How many of the CPUs other programs kept busy between two readings `elapsed` seconds apart."""
    return max(0.0, (after.busy - before.busy) - (after.ours - before.ours)) / elapsed


def whole_cpus(busy: float, cpus: int) -> int:
    """The whole CPUs `busy` stands for (half and over counts as one), at most `cpus`."""
    return min(cpus, math.floor(busy + 0.5))


def choose_threads(cpus: int, busy_elsewhere: float) -> int:
    """One thread per CPU that other programs leave free; never fewer than one."""
    return max(1, cpus - whole_cpus(busy_elsewhere, cpus))


def threads_reason(cpus: int, busy_elsewhere: float) -> str:
    """Why choose_threads chose its count, for !status: "1 of 2 CPUs busy with other programs"."""
    busy = whole_cpus(busy_elsewhere, cpus)
    return f"{busy} of {cpus} CPU{'s' if cpus != 1 else ''} busy with other programs" if busy else ONE_PER_CPU


class StartingThreads:
    """The CPU thread count a backend loads with, and why. When chat chooses it and the model runs on the CPU,
    the CPUs are read from here to settle(): the reading overlaps the load (our own CPU time is not counted)."""

    def __init__(self, options: LoadOptions | None, device_type: str):
        fixed = fixed_threads(options)
        self.count, self.reason = fixed if fixed else (cpu_threads(options), ONE_PER_CPU)
        self._cpus = allowed_cpus()
        self._began = time.monotonic()
        measure = fixed is None and device_type == "cpu" and bool(self._cpus)
        self._before = read_cpu_times(self._cpus) if measure else None

    def settle(self) -> int:
        """The count to run with: one per CPU less those other programs kept busy since __init__."""
        if self._before is None:
            return self.count
        time.sleep(max(0.0, self._began + START_WINDOW_S - time.monotonic()))
        ended = time.monotonic()
        after = read_cpu_times(self._cpus)
        if after is not None:
            busy = busy_elsewhere(self._before, after, ended - self._began)
            self.count = choose_threads(len(self._cpus), busy)
            self.reason = threads_reason(len(self._cpus), busy)
        return self.count


class ThreadTuner:
    """Follows other programs' use of the CPUs while replies decode, and sets torch's thread count (and the
    backend's info) to match: fewer when a neighbour comes, one per CPU again when it goes. It does nothing
    off the CPU or when the user fixed the count.

    step() runs before every decode step: a clock read and a few comparisons. Every EVERY_S, or at once after
    a step far slower than the recent ones (a neighbour has come), it reads the CPUs against its last reading.
    The first step of a reply reads over the pause since the reply before: a neighbour that was there while
    the person typed is acted on at once.
    """

    def __init__(
        self,
        info: BackendInfo,
        cpus: Collection[int] | None = None,
        read: Callable[[Collection[int]], CpuTimes | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.info = info
        self._cpus = allowed_cpus() if cpus is None else cpus
        self._read = read or read_cpu_times
        self._clock = clock
        self.active = info.device == "cpu" and info.threads_reason not in (BY_OPTION, BY_ENV) and bool(self._cpus)
        self._times: CpuTimes | None = None  # the last reading, taken at self._at
        self._at = -math.inf
        self._last = -math.inf  # the last step() call
        self._quickest = math.inf  # the quickest recent step, let rise a little each step

    def step(self) -> None:
        if not self.active:
            return
        now = self._clock()
        step, self._last = now - self._last, now
        slow = step > SLOW_STEP * self._quickest
        self._quickest = min(step, self._quickest * 1.05)
        window = now - self._at
        if window >= EVERY_S or (slow and window >= SHORTEST_S):
            self._retune(now, window)

    def _retune(self, now: float, window: float) -> None:
        before, self._times, self._at = self._times, self._read(self._cpus), now
        if before is None or self._times is None:
            return
        busy = busy_elsewhere(before, self._times, window)
        count = choose_threads(len(self._cpus), busy)
        if count != self.info.threads:
            import torch

            torch.set_num_threads(count)
            self.info.threads = count
        self.info.threads_reason = threads_reason(len(self._cpus), busy)
