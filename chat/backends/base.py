"""What the session needs from a backend and from its tokenizer.

A backend owns a model and its key/value cache. It is driven one sequence at a time:
`prefill(ids)` starts (or continues, when `ids` extends what is cached) a sequence and returns the
next-token logits; `decode(token)` appends one token and returns the next logits. Sampling, stop
conditions and streaming text live in `chat.generation`, shared by all backends.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

Message = dict[str, str]  # {"role": ..., "content": ...}


@dataclass
class LoadOptions:
    """How the user asked for the model to be loaded (from the command line)."""

    model: str
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    quantize: str = "auto"  # auto | int8 | int4 | none: the weights of an artifact exported on first use
    first_use: bool = True  # export on first use into chat's cache, and take artifacts from it (not --no-export)
    offline: bool = False
    trust_remote_code: bool = False
    threads: int | None = None  # CPU threads for torch; None: cpu_threads()


@dataclass
class BackendInfo:
    name: str  # "transformers" or "torchscript"
    model: str  # what the user named
    path: str  # the local directory loaded
    device: str  # torch device string, e.g. "cpu", "cuda:0"
    dtype: str  # "float32", "bfloat16", ...
    context_length: int  # most tokens one sequence may hold (prompt + reply)
    threads: int = 0  # CPU threads torch uses
    threads_reason: str = ""  # why that many: BY_OPTION, BY_ENV, or from chat.threads ("one per CPU", ...)
    reason: str = ""  # why this backend was chosen (shown by !status)
    kernels: str = ""  # "native AVX-512" (or AVX2) when decode runs on chat's native CPU kernels (chat.native)
    quantization: str = ""  # "int8" or "int4" when the matmul weights are (export --quantize)
    notes: list[str] = field(default_factory=list)  # e.g. why auto fell back

    @property
    def runs_on(self) -> str:
        """The dtype, int8 weights if so, and the kernels when they are chat's own:
        "float32, int8 weights, native AVX-512 kernels"."""
        quantized = f", {self.quantization} weights" if self.quantization else ""
        return self.dtype + quantized + (f", {self.kernels} kernels" if self.kernels else "")


class ChatTokenizer(Protocol):
    eos_token_ids: set[int]

    @property
    def has_chat_template(self) -> bool: ...

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens left out."""
        ...

    def render(self, messages: list[Message]) -> str:
        """The prompt text for `messages` by the model's chat template, ready for the assistant."""
        ...


class Backend(Protocol):
    info: BackendInfo
    tokenizer: ChatTokenizer

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Make `ids` the whole cached sequence; return 1-D next-token logits.

        A backend may keep the longest common prefix of its cache and only run the rest; it must
        stay consistent if interrupted (KeyboardInterrupt) at any point.
        """
        ...

    def decode(self, token: int) -> torch.Tensor:
        """Append `token` to the cached sequence; return 1-D next-token logits."""
        ...

    def close(self) -> None: ...


BY_OPTION, BY_ENV = "--threads", "OMP_NUM_THREADS"  # what fixed a thread count the user chose


def fixed_threads(options: LoadOptions | None = None) -> tuple[int, str] | None:
    """The CPU thread count the user fixed and by what (BY_OPTION or BY_ENV); None when chat chooses."""
    if options is not None and options.threads:
        return options.threads, BY_OPTION
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), BY_ENV
    return None


def cpu_threads(options: LoadOptions | None = None) -> int:
    """CPU threads for torch to load with: --threads, else OMP_NUM_THREADS, else every CPU this process may run on.

    One thread per CPU is fastest on an idle machine; when other programs keep CPUs busy, fewer threads avoid
    waiting on a thread that is not running: chat.threads reads how many are busy and lowers the count."""
    fixed = fixed_threads(options)
    if fixed is not None:
        return fixed[0]
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share: the part of a cache a new prompt can reuse."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
