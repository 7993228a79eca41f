#!/usr/bin/env python3
"""Where a decode step of an artifact spends its time: ops (CPU) or kernels (CUDA) per token.

Usage:
  profile_decode.py ARTIFACT [--context=N] [--steps=N] [--rows=N]
  profile_decode.py (-h | --help)

Options:
  --context=N  tokens in the cache when the profiled steps run [default: 192]
  --steps=N    decode steps profiled; the table is per step [default: 20]
  --rows=N     table rows [default: 25]

On CUDA the steps run without CUDA graphs, so each kernel shows with its shape (a graph replays the
same kernels), and then through the graphs, to compare the wall time per token with the GPU time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docopt import docopt


def main() -> int:
    args = docopt(__doc__)
    from torch.profiler import ProfilerActivity, profile

    from chat.backends.torchscript_backend import TorchScriptBackend

    context, steps, rows = int(args["--context"]), int(args["--steps"]), int(args["--rows"])
    backend = TorchScriptBackend(args["ARTIFACT"], cuda_graphs=False)
    cuda = backend.info.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    seconds_per_step(backend, fresh_prompt(backend, context), 8)  # warm-up
    token = fresh_prompt(backend, context)
    with profile(activities=activities, record_shapes=True) as prof:
        per_step = seconds_per_step(backend, token, steps)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"{args['ARTIFACT']}: {backend.info.device} {backend.info.dtype}, {context} cached tokens, {steps} steps")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=rows))
    events = prof.key_averages()
    if cuda:
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / steps
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA") / steps
        wall = per_step * 1e3
        print(f"per step without graphs: {wall:.2f} ms wall, {gpu_us / 1e3:.2f} ms GPU, {kernels:.0f} kernels")
        backend.close()
        graphed = TorchScriptBackend(args["ARTIFACT"])
        seconds_per_step(graphed, fresh_prompt(graphed, context), 8)
        graphed_ms = seconds_per_step(graphed, fresh_prompt(graphed, context), 200) * 1e3
        print(f"per step with CUDA graphs: {graphed_ms:.3f} ms wall")
    else:
        ops = sum(e.count for e in events if e.key.startswith(("aten::", "chat::"))) / steps
        print(f"per step: {per_step * 1e3:.2f} ms wall, {ops:.0f} op calls (aten and chat, views included)")
    return 0


def fresh_prompt(backend, length: int) -> int:
    """Prefill a new prompt of `length` tokens spread over the vocabulary; its greedy next token."""
    ids = [(i * 7919) % (backend.shape.vocab_size - 5) + 5 for i in range(length)]
    return int(backend.prefill(ids).argmax())


def seconds_per_step(backend, token: int, count: int) -> float:
    """Seconds per step of `count` greedy decode steps from `token`, waiting for the GPU where there is one."""
    import torch

    def sync() -> None:
        if backend.info.device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    started = time.perf_counter()
    for _ in range(count):
        token = int(backend.decode(token).argmax())
    sync()
    return (time.perf_counter() - started) / count


if __name__ == "__main__":
    raise SystemExit(main())
