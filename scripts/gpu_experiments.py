#!/usr/bin/env python3
"""A/B candidate changes to the exported decode step, in one process, for the scarce GPU sessions.

Usage:
  gpu_experiments.py MODEL [--device=DEVICE] [--dtype=DTYPE] [--tokens=N]
  gpu_experiments.py (-h | --help)

Options:
  --device=DEVICE  where to export and run [default: cuda]
  --dtype=DTYPE    the artifacts' dtype [default: bfloat16]
  --tokens=N       greedy decode steps timed per variant and round [default: 256]

Each variant is the exporter with one change patched in (the product code has no switches for them),
exported to a temporary directory, loaded through TorchScriptBackend (CUDA graphs on CUDA) and timed
after a 64-token prompt, the variants interleaved over three rounds. A variant that wins here becomes
the exporter's code; the rest are deleted from this file.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docopt import docopt


@contextlib.contextmanager
def fused_residual() -> Iterator[None]:
    """Decode's residual adds as in-place addmv_ on the residual stream: cuBLAS adds it (beta=1), one kernel
    instead of a matrix-vector product and an add, twice a layer (one rounding instead of two in bf16)."""
    from chat.export import model

    plain = model.Layer._add_linear

    def add_linear(self, x, h, w, b, name):
        if self.for_cuda and h.dim() == 1 and b is None and name not in self.transposed:
            return x.addmv_(w, h)  # out of place, addmv would first copy x: the kernel this saves
        return plain(self, x, h, w, b, name)

    model.Layer._add_linear = add_linear
    try:
        yield
    finally:
        model.Layer._add_linear = plain


VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "baseline": contextlib.nullcontext,
    "fused_residual": fused_residual,
}


def main() -> int:
    args = docopt(__doc__)
    from profile_decode import fresh_prompt, seconds_per_step  # this script's folder is on sys.path

    from chat.backends.base import LoadOptions
    from chat.backends.torchscript_backend import TorchScriptBackend
    from chat.export import export

    device, dtype, tokens = args["--device"], args["--dtype"], int(args["--tokens"])
    backends = {}
    with tempfile.TemporaryDirectory(prefix="gpu-experiments-") as work:
        for name, patch in VARIANTS.items():
            with patch():
                artifact = export(args["MODEL"], Path(work) / name, device=device, dtype=dtype, verify=True)
            backends[name] = TorchScriptBackend(artifact, LoadOptions(model=str(artifact)))  # all read in now

    results: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(3):
        for name, backend in backends.items():
            results[name].append(1 / seconds_per_step(backend, fresh_prompt(backend, 64), tokens))
    for name, rates in results.items():
        rounds = ", ".join(f"{r:.0f}" for r in rates)
        print(f"{name:16s} decode {statistics.median(rates):7.1f} tok/s (rounds: {rounds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
