"""The small torch steps the lean modules and chat.native's fallback ops share."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch


def unit_norm(x: torch.Tensor, eps_root: torch.Tensor) -> torch.Tensor:
    """RMSNorm without its weight, divided by sqrt(width): x / sqrt(sum(x^2) + width * eps), eps_root being
    sqrt(width * eps). Three cheap ops; F.rms_norm costs about four times as much per call at decode."""
    return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), eps_root)


def eps_term(width: int, eps: float) -> float:
    """RMSNorm's eps as unit_norm and the native kernels take it: sqrt(width * eps)."""
    return (width * eps) ** 0.5


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps_root: torch.Tensor, root: float) -> torch.Tensor:
    """RMSNorm as transformers rounds it: normalised in float32, cast back, then scaled in the model's dtype;
    root is sqrt(width)."""
    if x.dtype == torch.float32:  # decided at trace time: no cast ops in a float32 graph
        return weight * (unit_norm(x, eps_root) * root)
    return weight * (unit_norm(x.float(), eps_root) * root).to(x.dtype)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """RoPE (rotate-half form) on the first rotary_dim features of every head; sin has its sign folded in.

    The halves are swapped by a cat of two slices: TorchScript's CUDA fuser merges it with the products
    into one kernel, and on CPU it is what torch.roll does inside."""
    rot, rest = (x[..., :rotary_dim], x[..., rotary_dim:]) if rotary_dim < x.size(-1) else (x, None)
    half = rotary_dim // 2
    swapped = torch.cat([rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos + swapped * sin
    return out if rest is None else torch.cat([out, rest], dim=-1)


INT4_GROUP, INT4_RUN = 32, 64  # weights per step and offset; weights per 32 bytes (chat/native/int4.h)


def int4_weights(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int4 rows (uint8, two weights a byte: per run of 64, byte j holds weight j low and 32 + j high) made whole
    in float32 by their groups' steps and offsets (float16, (rows, 2, groups)): w = d * q + m."""
    rows, width = packed.size(0), 2 * packed.size(1)
    runs = packed.reshape(rows, width // INT4_RUN, 1, 32)
    levels = torch.cat([runs & 15, runs >> 4], dim=2).reshape(rows, width // INT4_GROUP, INT4_GROUP).float()
    return (levels * scales[:, 0].float().unsqueeze(2) + scales[:, 1].float().unsqueeze(2)).reshape(rows, width)


def quantized_weights(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Quantized weights made whole in float32: int4 groups (uint8 w, see int4_weights), or int8 rows times their
    float32 scales."""
    return int4_weights(w, scales) if w.dtype == torch.uint8 else w.float() * scales.unsqueeze(1)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap), Gemma 2's bound on attention scores and logits, in transformers' order of ops."""
    return torch.tanh(x / cap) * cap


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Hide TorchScript's deprecation and tracer warnings: they concern torch's plans, not the user's chat
    (docs/backends.md says which torch versions work)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield
