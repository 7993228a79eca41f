"""q/k norms, RoPE and attention over the KV cache: one class per form, picked by chat.lean.model.build.

The cache of a layer is (1, kv_heads, length, head_dim) per keys and values, held in the Attention module as
buffers (chat.lean.cache gives and grows them). New keys go in at their positions; attention reads the
positions 0..W-1 that `window` lists (its length is traced as a dynamic size), under the mask the model made
for the layer's kind (see chat.lean.model.Masks): none at a CPU decode step of a full-attention layer, which
then reads exactly the filled prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chat.lean.layers import NormedLinear
from chat.lean.ops import rotate_half, softcap
from chat.lean.shape import Shape

# The rows of a RoPE table for this step's positions: (cos, sin) to rotate halves with, or one token's
# (head_dim, head_dim) rotation matrix (chat.lean.model.MatrixRope); None for a layer without RoPE.
Rope = tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None


class QKNorm(nn.Module):
    """RMSNorm of q and of k before RoPE, over each head (Qwen3, Gemma 3) or over the whole width (OLMo 2)."""

    def __init__(self, shape: Shape, q_norm: nn.Module, k_norm: nn.Module):
        super().__init__()
        self.q_norm, self.k_norm = q_norm, k_norm
        d = shape.head_dim
        self.sizes = [shape.heads * d, shape.kv_heads * d, shape.kv_heads * d]
        self.q_width = d if shape.qk_norm == "head" else shape.heads * d
        self.k_width = d if shape.qk_norm == "head" else shape.kv_heads * d

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.split(self.sizes, dim=-1)
        q = self.q_norm(q.unflatten(-1, (-1, self.q_width))).flatten(-2)
        k = self.k_norm(k.unflatten(-1, (-1, self.k_width))).flatten(-2)
        return torch.cat([q, k, v], dim=-1)


class Weigh(nn.Module):
    """softmax(q.k * scale + mask) @ v, on SDPA (its flash kernel on CPU for the 4-D form)."""

    def __init__(self, scale: float | None):
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)


class SoftcappedWeigh(Weigh):
    """Gemma 2: scores soft-capped before the mask, which SDPA cannot do; softmax in float32 as transformers'."""

    def __init__(self, scale: float | None, cap: float, head_dim: int):
        super().__init__(scale)
        self.cap = cap
        self.factor = scale if scale is not None else head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        scores = softcap(torch.matmul(q, k.transpose(-1, -2)) * self.factor, self.cap)
        if mask is not None:
            scores = scores + mask
        return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


class Attention(nn.Module):
    """The attention half of a layer up to its output projection: q/k/v product (after the layer's first norm),
    q/k norms, RoPE, the cache write and attention over the positions the window and mask allow."""

    def __init__(self, shape: Shape, qkv: NormedLinear, qk_norm: QKNorm | None, weigh: Weigh, layer: int):
        super().__init__()
        self.shape = shape
        self.qkv = qkv
        self.qk_norm = qk_norm
        self.weigh = weigh
        self.window = shape.windows[layer]  # 0: every earlier position; W: the last W
        self.rope_table = shape.rope_tables[layer]
        self.register_buffer("k_cache", torch.zeros(0))  # given by chat.lean.cache
        self.register_buffer("v_cache", torch.zeros(0))

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        window: torch.Tensor,
        ropes: list[Rope],
        masks: dict[int, torch.Tensor | None],
    ) -> torch.Tensor:
        qkv = self.qkv(x)
        if self.qk_norm is not None:
            qkv = self.qk_norm(qkv)
        rope = ropes[self.rope_table] if self.rope_table >= 0 else None
        return self.attend(qkv, positions, window, rope, masks[self.window])

    def attend(
        self, qkv: torch.Tensor, positions: torch.Tensor, window: torch.Tensor, rope: Rope, mask: torch.Tensor | None
    ) -> torch.Tensor:
        s = self.shape
        groups = s.heads // s.kv_heads
        one = qkv.dim() == 1  # decided at trace time: decode has fewer reshapes
        qk, v = qkv.split([(s.heads + s.kv_heads) * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
        # One token: heads as (1, heads, 1, head_dim), the cache's layout, so keys and values go in as they are.
        qk = qk.reshape(1, -1, 1, s.head_dim) if one else qk.reshape(-1, s.heads + s.kv_heads, s.head_dim)
        if isinstance(rope, torch.Tensor):
            qk = torch.matmul(qk, rope)
        elif rope is not None:
            qk = rotate_half(qk, rope[0], rope[1], s.rotary_dim)
        q, k = qk.split([s.heads, s.kv_heads], dim=1)
        v = v.reshape(1, -1, 1, s.head_dim) if one else v.reshape(-1, s.kv_heads, s.head_dim)
        self.k_cache.index_copy_(2, positions, k if one else k.transpose(0, 1).unsqueeze(0))
        self.v_cache.index_copy_(2, positions, v if one else v.transpose(0, 1).unsqueeze(0))
        size = window.size(0)
        keys, values = self.k_cache.narrow(2, 0, size), self.v_cache.narrow(2, 0, size)
        # Query heads grouped by their kv head, (1, kv_heads, groups * tokens, head_dim): no repeat of K/V,
        # and 4-D so that CPU takes its flash kernel (the 3-D form falls back to the slow math path).
        if one:
            q = q.reshape(1, s.kv_heads, groups, s.head_dim)
        else:
            q = q.reshape(-1, s.kv_heads, groups, s.head_dim).permute(1, 2, 0, 3).reshape(1, s.kv_heads, -1, s.head_dim)
        out = self.weigh(q, keys, values, mask)
        if one:
            return out.reshape(-1)
        return out.reshape(s.kv_heads, groups, -1, s.head_dim).permute(2, 0, 1, 3).reshape(-1, s.heads * s.head_dim)


class NativeAttention(Attention):
    """At one token: RoPE, the cache write and attention in one native op (chat::cache_attend)."""

    def attend(
        self, qkv: torch.Tensor, positions: torch.Tensor, window: torch.Tensor, rope: Rope, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if qkv.dim() != 1:
            return super().attend(qkv, positions, window, rope, mask)
        cos, sin = rope if isinstance(rope, tuple) else (None, None)
        extra = []  # only what differs from the op's defaults, so llama-like graphs keep the plain call
        s = self.shape
        if s.attn_scale or s.attn_softcap or self.window:
            extra = [s.attn_scale or None, s.attn_softcap or None, self.window or None]
        return torch.ops.chat.cache_attend(qkv, cos, sin, self.k_cache, self.v_cache, positions, window, *extra)
