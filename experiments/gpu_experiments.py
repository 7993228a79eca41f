#!/usr/bin/env python3
"""A/B candidate changes to the exported decode step, in one process, for the scarce GPU sessions.

Usage:
  gpu_experiments.py MODEL [--device=DEVICE] [--dtype=DTYPE] [--tokens=N] [--contexts=LIST]
  gpu_experiments.py (-h | --help)

Options:
  --device=DEVICE  where to export and run [default: cuda]
  --dtype=DTYPE    the artifacts' dtype [default: bfloat16]
  --tokens=N       greedy decode steps timed per variant and round [default: 256]
  --contexts=LIST  prompt lengths the steps follow [default: 64,1000]

Each variant is the exporter with one change patched in (the product code has no switches for them),
exported to a temporary directory, loaded through TorchScriptBackend (CUDA graphs on CUDA) and timed
after prompts of each length, the variants interleaved over four rounds in alternating order. A variant that
wins here becomes the exporter's code; the rest are deleted from this file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# chat when it is not installed, and tools/ for profile_decode's timing (triton_decode is beside this script).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

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
if importlib.util.find_spec("triton"):  # CUDA builds of torch bring triton; CPU ones (CI's) do not
    # At import: registers the chat_triton ops, which loading the variant's artifact needs.
    from triton_decode import fused_decode

    VARIANTS["triton_fused"] = fused_decode


def main() -> int:
    args = docopt(__doc__)
    from profile_decode import fresh_prompt, seconds_per_step

    from chat.backends.base import LoadOptions
    from chat.backends.torchscript_backend import TorchScriptBackend
    from chat.export import export

    device, dtype, tokens = args["--device"], args["--dtype"], int(args["--tokens"])
    contexts = [int(n) for n in args["--contexts"].split(",")]
    backends = {}
    with tempfile.TemporaryDirectory(prefix="gpu-experiments-") as work:
        for name, patch in VARIANTS.items():
            try:  # one failing candidate must not cost the session the others' numbers
                with patch():
                    artifact = export(args["MODEL"], Path(work) / name, device=device, dtype=dtype, verify=True)
                backends[name] = TorchScriptBackend(artifact, LoadOptions(model=str(artifact)))  # all read in now
            except Exception as why:
                print(f"{name:16s} failed to export or load: {type(why).__name__}: {why}", flush=True)

    results: dict[tuple[str, int], list[float]] = {(name, n): [] for name in backends for n in contexts}
    for round_ in range(4):  # the order flips each round: on the CPU, a fixed order favoured the second by up to 20%
        for name, backend in list(backends.items())[:: 1 if round_ % 2 == 0 else -1]:
            for n in contexts:
                results[name, n].append(1 / seconds_per_step(backend, fresh_prompt(backend, n), tokens))
    for (name, n), rates in results.items():
        rounds = ", ".join(f"{r:.0f}" for r in rates)
        print(f"{name:16s} decode after {n:5d} tokens {statistics.median(rates):7.1f} tok/s (rounds: {rounds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
