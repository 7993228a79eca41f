#!/usr/bin/env python3
"""Decode speed beside a busy neighbour: chat's own thread count against fixed --threads counts.

Usage:
  bench_busy.py [--model=DIR] [--rounds=N] [--new-tokens=N] [--fixed=LIST] [--quiet]
  bench_busy.py (-h | --help)

Options:
  --model=DIR      the model; chat picks its TorchScript artifact [default: models/smollm2-135m-instruct]
  --rounds=N       runs of each setting, taken in turn round by round [default: 5]
  --new-tokens=N   tokens in each reply (EOS ignored) [default: 128]
  --fixed=LIST     the --threads counts to compare with [default: 1,2]
  --quiet          no neighbour: the same comparison on an otherwise idle machine

A neighbour is a `python -c "while True: pass"` child pinned to the last CPU this process may run on. Each run
is the real one-shot chat (`python -m chat MODEL --prompt ... --verbose`, greedy) in a process of its own; its
--verbose stats line gives the first-token time and the decode rate. The settings take turns, so a change in
the machine's other load falls on all of them alike; the load average is shown before and after.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from docopt import docopt  # noqa: E402

PROMPT = "Tell me a long story about a lighthouse keeper and a storm."
STATS = re.compile(r"first token (\d+) ms, ([\d.]+) tok/s")


def main() -> int:
    args = docopt(__doc__)
    rounds, new_tokens = int(args["--rounds"]), int(args["--new-tokens"])
    settings = {"default": [], **{f"--threads {n}": ["--threads", n] for n in args["--fixed"].split(",")}}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
    before = os.getloadavg()
    neighbour, cpu = (None, "") if args["--quiet"] else start_neighbour()
    try:
        for number in range(1, rounds + 1):
            for name, extra in settings.items():
                ttft_ms, tok_s = run_chat(args["--model"], new_tokens, extra)
                runs[name].append((ttft_ms, tok_s))
                print(f"round {number}/{rounds} {name}: first token {ttft_ms:.0f} ms, {tok_s:.1f} tok/s", flush=True)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    after = os.getloadavg()
    where = "no neighbour" if neighbour is None else f"a neighbour spinning on {cpu}"
    print(f"\n{where}; load average {loads(before)} before, {loads(after)} after ({os.cpu_count()} CPUs)")
    print(report(runs))
    return 0


def start_neighbour() -> tuple[subprocess.Popen, str]:
    """A child that keeps one CPU busy, pinned to the last CPU this process may run on where that can be;
    and which CPU that is, in words."""
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    cpu = "one CPU (unpinned)"
    if hasattr(os, "sched_setaffinity"):
        last = max(os.sched_getaffinity(0))
        os.sched_setaffinity(neighbour.pid, {last})
        cpu = f"CPU {last}"
    time.sleep(1.0)  # under way before the first run
    return neighbour, cpu


def run_chat(model: str, new_tokens: int, extra: list[str]) -> tuple[float, float]:
    """One one-shot reply: its first-token ms and decode tok/s."""
    command = [sys.executable, "-m", "chat", model, "--temperature", "0", "--max-new-tokens", str(new_tokens)]
    command += ["--min-new-tokens", str(new_tokens), "--verbose", "--prompt", PROMPT, *extra]
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=environment, check=False)
    found = STATS.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return float(found[1]), float(found[2])


def loads(averages: tuple[float, float, float]) -> str:
    return " ".join(f"{value:.2f}" for value in averages)


def report(runs: dict[str, list[tuple[float, float]]]) -> str:
    """min/median/max of each setting, and the default against the best fixed count."""
    lines = [f"{'':<12}  {'decode tok/s min/median/max':<28}  first token ms min/median/max"]
    for name, results in runs.items():
        ttft, rate = sorted(r[0] for r in results), sorted(r[1] for r in results)
        spread = f"{rate[0]:.1f} / {statistics.median(rate):.1f} / {rate[-1]:.1f}"
        lines.append(f"{name:<12}  {spread:<28}  {ttft[0]:.0f} / {statistics.median(ttft):.0f} / {ttft[-1]:.0f}")
    median = {
        name: tuple(statistics.median(column) for column in zip(*results, strict=True))
        for name, results in runs.items()
    }
    fixed = [name for name in runs if name != "default"]
    fastest = max(fixed, key=lambda name: median[name][1])
    quickest = min(fixed, key=lambda name: median[name][0])
    lines.append(
        f"default / best fixed: decode {median['default'][1] / median[fastest][1]:.2f} (of {fastest}), "
        f"first token {median['default'][0] / median[quickest][0]:.2f} (of {quickest}), medians"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
