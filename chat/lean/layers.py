"""Norms, projections and residual adds of the lean module: one class per form, picked by chat.lean.model.build.

Every forward takes x of (tokens, width) in prefill, or (width,) for the one token of a decode step: decode's
matmuls are then matrix-vector products. Where chat's native kernels run decode (chat.native), the
Native* forms call them at one token, and torch's kernels for prefill.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chat.lean.ops import eps_term, rms_norm, unit_norm

# What a native matvec kernel applies to x before its product: (sqrt(width * eps), norm weight or None for a
# weight folded into the matmul's), or (None, None) for nothing.
KernelNorm = tuple[float | None, torch.Tensor | None]
NO_KERNEL_NORM: KernelNorm = (None, None)


# --- norms ---


class RMSNorm(nn.Module):
    """RMSNorm as transformers rounds it on the CPU (chat.lean.ops.rms_norm)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight)
        self.eps = eps_term(weight.numel(), eps)
        self.register_buffer("eps_root", torch.tensor(self.eps, dtype=torch.float32, device=weight.device))
        self.root = weight.numel() ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps_root, self.root)

    def kernel_norm(self) -> KernelNorm:
        return self.eps, self.weight


class FoldedRMSNorm(nn.Module):
    """RMSNorm whose weight (and sqrt(width)) went into the next matmul's columns: (x * r * g) @ W.T =
    (x * r) @ (W * g).T. Float32 on the CPU, where a decode step's small ops are a measurable share."""

    def __init__(self, width: int, eps: float, device: torch.device):
        super().__init__()
        self.eps = eps_term(width, eps)
        self.register_buffer("eps_root", torch.tensor(self.eps, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unit_norm(x, self.eps_root)

    def kernel_norm(self) -> KernelNorm:
        return self.eps, None


class FusedRMSNorm(nn.Module):
    """CUDA: one kernel, float math inside and one rounding at the end (transformers rounds before the weight)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.weight.numel(),), self.weight, self.eps)


class Float32RMSNorm(nn.Module):
    """RMSNorm with its weight applied in float32 before the one cast back: OLMo 2's, and Gemma's, whose weight
    stands for 1 + w (given here as that sum)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.register_buffer("eps_root", torch.tensor(eps_term(weight.numel(), eps), device=weight.device))
        self.root = weight.numel() ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (unit_norm(x.float(), self.eps_root) * self.root * self.weight).to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.weight.numel(),), self.weight, self.bias, self.eps)


class NoNorm(nn.Module):
    """Where a family has no norm before a half (OLMo 2 normalises after)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# --- linear maps: forward(x) = x @ W.T + b, add_to(r, x) = r + forward(x) ---


class Linear(nn.Module):
    """W stored (out, in): matrix-vector products at one token."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            return torch.mv(self.weight, x) if self.bias is None else torch.addmv(self.bias, self.weight, x)
        return F.linear(x, self.weight, self.bias)

    def add_to(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return r + self(x)


class AddInMatmulLinear(Linear):
    """CPU float32 without a bias: the residual add rides in the matmul, addmv at decode (one op fewer) and
    addmm at prefill (MKL adds with beta=1 instead of a pass over r: 5% of a 512-token prefill)."""

    def add_to(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            return torch.addmv(r, self.weight, x)
        return torch.addmm(r, x, self.weight.t())


class TransposedLinear(nn.Module):
    """W stored (in, out): on CPU in float32 on torch's kernels, MKL's x @ W beats x @ W.T at one token for
    weights whose output is wider than their input (10-20% on q/k/v, gate/up and the output head)."""

    def __init__(self, weight_in_out: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight_in_out)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight)
        return y if self.bias is None else y + self.bias

    def add_to(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and self.bias is None:
            return torch.addmm(r, x, self.weight)
        return r + self(x)


class NativeLinear(Linear):
    """One token's products on chat's native kernels, which can apply x's RMSNorm first; prefill on torch's."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight, bias)
        self.register_buffer("scale", None)  # int8 rows' scales (NativeInt8Linear); the kernels take None

    def forward(self, x: torch.Tensor, norm: KernelNorm = NO_KERNEL_NORM) -> torch.Tensor:
        if x.dim() == 1:
            y = torch.ops.chat.matvec(self.weight, x, *norm, self.scale)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.prefill_weight(x), self.bias)

    def add_to(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1 and self.bias is None:
            return torch.ops.chat.add_matvec(r, self.weight, x, self.scale)
        return r + self(x)

    def prefill_weight(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight


class NativeAddmmLinear(NativeLinear):
    """Float32 on the native kernels: prefill's residual add inside the matmul (see AddInMatmulLinear)."""

    def add_to(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and self.bias is None:
            return torch.addmm(r, x, self.weight.t())
        return super().add_to(r, x)


class NativeQuantizedLinear(NativeLinear):
    """int8 rows with a float32 scale each, or int4 rows with a step and an offset per group of 32
    (chat.export.quantize): decode's kernels read the rounded rows, and prefill multiplies by the weights made
    whole again."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight, bias)
        self.scale = scale

    def prefill_weight(self, x: torch.Tensor) -> torch.Tensor:
        # x is an argument so that freezing cannot fold the op into a constant: a whole copy of the weights.
        return torch.ops.chat.dequantize(self.weight, self.scale, x)


# --- a norm and the product after it ---


class NormedLinear(nn.Module):
    def __init__(self, norm: nn.Module, linear: nn.Module):
        super().__init__()
        self.norm = norm
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))

    def split_norm(self, x: torch.Tensor) -> tuple[torch.Tensor, KernelNorm]:
        """x normalised, and no norm left for a kernel."""
        return self.norm(x), NO_KERNEL_NORM


class NativeNormedLinear(NormedLinear):
    """At one token the matvec kernel applies the RMSNorm itself: a dozen small ops fewer per norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            return self.linear(x, self.norm.kernel_norm())
        return self.linear(self.norm(x))

    def split_norm(self, x: torch.Tensor) -> tuple[torch.Tensor, KernelNorm]:
        if x.dim() == 1:
            return x, self.norm.kernel_norm()
        return self.norm(x), NO_KERNEL_NORM


# --- MLPs: the half before the down projection ---


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # In place on CPU (gate is a fresh matmul output): no new (tokens, intermediate) tensors, 11-13% off a
    # 512-token prefill and 3-4% off decode.
    return F.silu(gate, inplace=True).mul_(up)


def silu_mul_out_of_place(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up  # CUDA: the form its fuser makes one kernel


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


GATES = {"silu": silu_mul, "gelu_tanh": gelu_tanh_mul}
NATIVE_GATES = {"silu": "silu_mul_matvec", "gelu_tanh": "gelu_tanh_mul_matvec"}  # the same in chat.native's ops


class GatedMLP(nn.Module):
    """act(gate) * up from one [gate; up] product."""

    def __init__(self, up: NormedLinear, gate):
        super().__init__()
        self.up = up
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.gate(gate, up)


class NativeGatedMLP(GatedMLP):
    """At one token: the norm, [gate; up] product and act(gate) * up in one native op."""

    def __init__(self, up: NormedLinear, gate, activation: str):
        super().__init__(up, gate)
        self.op = NATIVE_GATES[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 1:
            return super().forward(x)
        h, norm = self.up.split_norm(x)
        return getattr(torch.ops.chat, self.op)(self.up.linear.weight, h, *norm, self.up.linear.scale)


class PlainMLP(nn.Module):
    """GPT-2's: gelu(tanh) of one product."""

    def __init__(self, up: NormedLinear):
        super().__init__()
        self.up = up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.up(x), approximate="tanh")


# --- back into the residual stream: forward(x, h) = x + out(h), in each family's way ---


class Residual(nn.Module):
    def __init__(self, out: nn.Module):
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.out.add_to(x, h)


class NormedResidual(nn.Module):
    """x + norm(out(h)): Gemma's norms after each half, and OLMo 2's."""

    def __init__(self, out: nn.Module, norm: nn.Module):
        super().__init__()
        self.out = out
        self.norm = norm

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.out(h))


class ScaledResidual(nn.Module):
    """x + out(h) * scale: Granite's residual_multiplier."""

    def __init__(self, out: nn.Module, scale: float):
        super().__init__()
        self.out = out
        self.scale = scale

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x + self.out(h) * self.scale
