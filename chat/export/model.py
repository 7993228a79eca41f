"""The lean decoder that export traces: one module for the supported families, built from their weights.

Per layer: one matmul for q/k/v and one for gate/up, RoPE from a precomputed table applied to q and k
at once, RMSNorm in float32, and a static KV cache held in the module as buffers. Attention reads only
the keys it needs: the filled prefix on CPU (the `window` input's length), or a fixed bucket of the
cache with a mask on CUDA, so a CUDA graph per bucket can replay the step.

Every method takes 1-D tensors: `ids` and `positions` of the new tokens and `window`, the key positions
0..W-1 (a view of an arange the caller keeps), whose length is traced as a dynamic size. Decode runs on
1-D hidden vectors, so its matmuls are matrix-vector products. On CPU in float32 (see fewest_ops) RMSNorm
weights are folded into the next matmul's weights, residual adds ride on addmv (addmm in prefill) and one
token's RoPE is one small matmul: a layer of decode is 26 graph ops instead of 31. Where chat's native
kernels are built (chat.native), CPU decode runs on them instead: a layer is five ops (q/k/v product with its
norm, RoPE + cache write + attention, output product + residual, gate/up + SiLU, down product + residual).
With int8 weights (chat.export.quantize) each matmul weight has its rows' scales beside it (name + "_scale"):
decode's native kernels read the int8 rows, and prefill multiplies by the weights made whole again.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Weights = dict[str, torch.Tensor | None]
# An RMSNorm left to a native kernel: its eps term sqrt(hidden * eps), and its weight (None where the weight
# is folded into the matmul's, with sqrt(hidden): the float32 CPU path).
RmsNorm = tuple[float, torch.Tensor | None] | None
MATMUL_WEIGHTS = ("wqkv", "wo", "wup", "wdown")  # a layer's; int8 with --quantize, as is the output head


@dataclass
class Shape:
    """What a traced module needs to know about its model; stored in the artifact's manifest."""

    family: str  # llama (also mistral, qwen2) | phi3 | gpt2
    vocab_size: int
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    norm: str  # "rms" (float32 inside) or "layer"
    norm_eps: float
    activation: str  # "silu" (gated) or "gelu_tanh" (plain MLP)
    rotary_dim: int  # 0: learned absolute positions instead of RoPE


def transposed_weights(shape: Shape, dtype: torch.dtype, device: torch.device, native: bool) -> set[str]:
    """Which weights to store as (in, out): on CPU in float32 without chat's native kernels, those whose
    output is wider than their input, since MKL's x @ W beats x @ W.T for them at one token (measured:
    10-20% on q/k/v, gate/up and the output head). bfloat16 decodes fastest with matrix-vector products on
    (out, in) weights, and so does float32 on the native kernels."""
    if device.type != "cpu" or dtype != torch.float32 or native:
        return set()
    inner = shape.heads * shape.head_dim
    qkv = inner + 2 * shape.kv_heads * shape.head_dim
    wide = {"wqkv": qkv > shape.hidden_size, "wo": shape.hidden_size > inner, "wup": True, "lm_head": True}
    return {name for name, is_wide in wide.items() if is_wide}


def fewest_ops(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the module takes the forms with the fewest ops per layer at decode: on CPU in float32, whose
    matrix-vector products leave the small ops of a layer a measurable share of a token (bfloat16 is
    bound by its matmuls, and 16-bit keeps transformers' rounding). RMSNorm weights go into the next matmul's
    weights ((x * r * g) @ W.T = (x * r) @ (W * g).T), the residual adds into addmv/addmm, RoPE is one matmul."""
    return device.type == "cpu" and dtype == torch.float32


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    transposed: bool,
    native: bool = False,
    norm: RmsNorm = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ W.T + b for a weight stored (out, in), or x @ W + b for one stored (in, out); x is 1-D at decode.
    native: one token's product on chat's native kernels, which apply x's RMSNorm first if `norm` is given.
    scale: w is int8, row i standing for w[i] * scale[i] (only with native)."""
    if transposed:
        y = torch.matmul(x, w)
        return y if b is None else y + b
    if native and x.dim() == 1:
        y = torch.ops.chat.matvec(w, x, *(norm or (None, None)), scale)
        return y if b is None else y + b
    if scale is not None:
        return F.linear(x, torch.ops.chat.dequantize(w, scale, x), b)
    if x.dim() == 1:
        return torch.mv(w, x) if b is None else torch.addmv(b, w, x)
    return F.linear(x, w, b)


class Layer(nn.Module):
    def __init__(self, shape: Shape, w: Weights, transposed: set[str], for_cuda: bool, fewest_ops: bool, native: bool):
        super().__init__()
        self.shape = shape
        self.transposed = transposed  # read at trace time only, like for_cuda, fewest_ops and native
        self.for_cuda = for_cuda
        self.fewest_ops = fewest_ops
        self.native = native
        quantized = w["wqkv"].dtype == torch.int8
        # int8 weights hold the rounded weights as transformers would run them (see chat.export.quantize).
        self.fold_norms = fewest_ops and shape.norm == "rms" and not quantized
        self.eps_root = eps_term(shape)  # for the native kernels
        if self.fold_norms:
            # The norm weight and sqrt(hidden) (see unit_norm) scale the matmul's inputs: into the weight's columns.
            root = shape.hidden_size**0.5
            w = dict(w, wqkv=w["wqkv"] * (w["ln1"] * root), wup=w["wup"] * (w["ln2"] * root), ln1=None, ln2=None)
        self.register_buffer("norm_eps", _eps_root(shape, for_cuda, w["wqkv"].device))
        w = {**{name + "_scale": None for name in MATMUL_WEIGHTS}, **w}
        for name, tensor in w.items():
            if name in transposed and tensor is not None:
                tensor = tensor.t().contiguous()
            self.register_buffer(name, tensor)
        self.register_buffer("k_cache", torch.zeros(0))  # (1, kv_heads, max_len, head_dim), set by allocate_cache
        self.register_buffer("v_cache", torch.zeros(0))

    def forward_tokens(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        window: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x: (tokens, hidden), or (hidden,) for one decoded token. rope: (cos, sin) rows of the positions, or
        for one token the (head_dim, head_dim) matrix that rotates a head (see LeanLM.__init__)."""
        s, t = self.shape, self.transposed
        one = x.dim() == 1  # decided at trace time: decode has fewer reshapes
        h, norm = self._norm_for(x, self.ln1, self.ln1_b)
        qkv = linear(h, self.wqkv, self.bqkv, "wqkv" in t, self.native, norm, self.wqkv_scale)
        if self.native and one:  # RoPE, the cache write and attention in one op
            cos, sin = rope if isinstance(rope, tuple) else (None, None)
            out = torch.ops.chat.cache_attend(qkv, cos, sin, self.k_cache, self.v_cache, positions, window)
        else:
            out = self._attention(qkv, positions, window, rope, mask, one)
        x = self._add_linear(x, out, self.wo, self.bo, "wo")
        h, norm = self._norm_for(x, self.ln2, self.ln2_b)
        if s.activation == "silu" and self.native and one and self.bup is None:
            h = torch.ops.chat.silu_mul_matvec(self.wup, h, *(norm or (None, None)), self.wup_scale)
        elif s.activation == "silu":
            gate, up = linear(h, self.wup, self.bup, "wup" in t, self.native, norm, self.wup_scale).chunk(2, dim=-1)
            # On CPU in place (gate is a fresh matmul output): no new (tokens, intermediate) tensors, 11-13% off a
            # 512-token prefill and 3-4% off decode; CUDA keeps the out-of-place form its fuser makes one kernel.
            h = F.silu(gate) * up if self.for_cuda else F.silu(gate, inplace=True).mul_(up)
        else:
            h = F.gelu(linear(h, self.wup, self.bup, "wup" in t, self.native, norm, self.wup_scale), approximate="tanh")
        return self._add_linear(x, h, self.wdown, self.bdown, "wdown")

    def _attention(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        window: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None,
        mask: torch.Tensor | None,
        one: bool,
    ) -> torch.Tensor:
        s = self.shape
        groups = s.heads // s.kv_heads
        qk_width = (s.heads + s.kv_heads) * s.head_dim
        qk, v = qkv.split([qk_width, s.kv_heads * s.head_dim], dim=-1)
        # One token: heads as (1, heads, 1, head_dim), the cache's layout, so keys and values go in as they are.
        qk = qk.reshape(1, -1, 1, s.head_dim) if one else qk.reshape(-1, s.heads + s.kv_heads, s.head_dim)
        if isinstance(rope, torch.Tensor):  # one token on CPU in float32: RoPE as one small matmul
            qk = torch.matmul(qk, rope)
        elif rope is not None:
            qk = rotate_half(qk, rope[0], rope[1], s.rotary_dim)
        q, k = qk.split([s.heads, s.kv_heads], dim=1)
        v = v.reshape(1, -1, 1, s.head_dim) if one else v.reshape(-1, s.kv_heads, s.head_dim)
        # Caches are (1, kv_heads, max_len, head_dim); new keys go in at their positions.
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
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        if one:
            out = out.reshape(-1)
        else:
            out = out.reshape(s.kv_heads, groups, -1, s.head_dim).permute(2, 0, 1, 3).reshape(-1, s.heads * s.head_dim)
        return out

    def _norm_for(
        self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, RmsNorm]:
        """The input of the matmul after a norm, or for one token on the native kernels x itself and the RMSNorm
        for the kernel to apply (a dozen small ops fewer per norm)."""
        if self.native and x.dim() == 1 and self.shape.norm == "rms":
            return x, (self.eps_root, None if self.fold_norms else weight)
        return self._norm(x, weight, bias), None

    def _norm(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        if self.fold_norms:
            return unit_norm(x, self.norm_eps)
        return _norm(self.shape, x, weight, bias, self.for_cuda, self.norm_eps)

    def _add_linear(self, x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, name: str):
        """x + linear(h); on the CPU float32 path the add rides in the matmul where it can: addmv at decode (one op
        fewer), addmm at prefill (MKL adds with beta=1 instead of a pass over x: 5% of a 512-token prefill);
        on the native kernels at decode, always."""
        scale = getattr(self, name + "_scale")
        if self.native and h.dim() == 1 and b is None:
            return torch.ops.chat.add_matvec(x, w, h, scale)
        if self.fewest_ops and b is None and scale is None:
            if h.dim() == 2:
                return torch.addmm(x, h, w if name in self.transposed else w.t())
            if name not in self.transposed:
                return torch.addmv(x, w, h)
        return x + linear(h, w, b, name in self.transposed, self.native, scale=scale)


class LeanLM(nn.Module):
    def __init__(
        self,
        shape: Shape,
        top: Weights,
        layers: list[Weights],
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        *,
        for_cuda: bool,
        transposed: set[str],
        fewest_ops: bool = False,
        native: bool = False,
    ):
        super().__init__()
        self.shape = shape
        # For CUDA: decode attends over a masked cache bucket (for CUDA graphs) instead of the exact prefix, and
        # norms and RoPE take the forms with the fewest kernels. On CPU, the forms with the fewest ops.
        self.for_cuda = for_cuda
        self.native = native  # decode's matrix-vector products on chat's native kernels (CPU)
        self.head_transposed = "lm_head" in transposed
        top = dict(top)
        if self.head_transposed:
            if top["lm_head"] is None:  # tied: keep one (hidden, vocab) copy; embedding reads its columns
                top["embed"] = top["embed"].t().contiguous()
            else:
                top["lm_head"] = top["lm_head"].t().contiguous()
        self.embed_transposed = self.head_transposed and top["lm_head"] is None
        top.setdefault("lm_head_scale", None)  # int8 head (see chat.export.quantize)
        for name, tensor in top.items():
            self.register_buffer(name, tensor)
        self.register_buffer("norm_eps", _eps_root(shape, for_cuda, top["embed"].device))
        self.register_buffer("cos", rope[0] if rope else None)
        self.register_buffer("sin", rope[1] if rope else None)
        # On CPU in float32 one token's RoPE is a matmul by a matrix made once per step: diag(cos) + swap * sin,
        # swap[j, i] = 1 where j = i +- head_dim / 2 (the rotate-half pairs). One op per layer instead of four.
        swap = None
        if fewest_ops and not native and rope and shape.rotary_dim == shape.head_dim:
            swap = torch.eye(shape.head_dim, dtype=rope[0].dtype, device=rope[0].device).roll(shape.head_dim // 2, 0)
        self.register_buffer("rope_swap", swap)
        self.blocks = nn.ModuleList(Layer(shape, w, transposed, for_cuda, fewest_ops, native) for w in layers)

    def allocate(self, max_len: int) -> None:
        allocate_cache(self, self.shape, max_len, self.norm_w.dtype, self.norm_w.device)

    def _run(
        self, ids: torch.Tensor, positions: torch.Tensor, window: torch.Tensor, mask: torch.Tensor | None, one: bool
    ) -> torch.Tensor:
        x = self.embed.index_select(1, ids).t() if self.embed_transposed else F.embedding(ids, self.embed)
        if self.pos_embed is not None:
            x = x + F.embedding(positions, self.pos_embed)
        x = x[0] if one else x
        rope = None
        if self.cos is not None:
            rope = (self.cos.index_select(0, positions).unsqueeze(1), self.sin.index_select(0, positions).unsqueeze(1))
        if one and self.native and rope is not None:  # the rows themselves, for chat::cache_attend
            rope = (rope[0][0, 0], rope[1][0, 0])
        elif one and self.rope_swap is not None:
            rope = torch.diag(rope[0][0, 0]) + self.rope_swap * rope[1][0]
        for block in self.blocks:
            x = block.forward_tokens(x, positions, window, rope, mask)
        x = x if one else x[-1]
        head = self.embed if self.lm_head is None else self.lm_head
        if self.native and self.shape.norm == "rms":  # the kernel applies the final norm
            norm = (eps_term(self.shape), self.norm_w)
            return linear(x, head, None, self.head_transposed, True, norm, self.lm_head_scale)
        x = _norm(self.shape, x, self.norm_w, self.norm_b, self.for_cuda, self.norm_eps)
        return linear(x, head, None, self.head_transposed, self.native, scale=self.lm_head_scale)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Run a chunk of tokens at `positions` (the keys are `window`, up to the chunk's end); last logits."""
        groups = self.shape.heads // self.shape.kv_heads
        # Additive, in the model's dtype, made once: SDPA would convert a boolean mask in every layer.
        mask = torch.where(window.unsqueeze(0) <= positions.unsqueeze(1), 0.0, float("-inf"))
        return self._run(ids, positions, window, mask.to(self.norm_w.dtype).repeat(groups, 1), one=False)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """One token; on CPU `window` is exactly the filled prefix, on CUDA a bucket masked past the token."""
        mask = None
        if self.for_cuda:  # additive, made once per step: SDPA then converts nothing in each layer
            mask = torch.where(window <= positions, 0.0, float("-inf")).to(self.norm_w.dtype).unsqueeze(0)
        return self._run(ids, positions, window, mask, one=True)


def allocate_cache(module: nn.Module, shape: Shape, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
    """Give every layer of `module` (eager or loaded TorchScript) a zeroed cache of max_len positions.

    The artifact is saved with empty caches so the file holds weights only."""
    for block in module.blocks.children():
        block.k_cache = torch.zeros(1, shape.kv_heads, max_len, shape.head_dim, dtype=dtype, device=device)
        block.v_cache = torch.zeros(1, shape.kv_heads, max_len, shape.head_dim, dtype=dtype, device=device)


def _norm(
    shape: Shape,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fused: bool,
    eps_root: torch.Tensor | None,
) -> torch.Tensor:
    if shape.norm == "layer":
        return F.layer_norm(x, (shape.hidden_size,), weight, bias, shape.norm_eps)
    if fused:
        # One kernel: float math inside, one rounding at the end (transformers rounds before the weight).
        return F.rms_norm(x, (shape.hidden_size,), weight, shape.norm_eps)
    # On CPU as transformers rounds: normalise in float32, cast back, then scale in the model's dtype; the
    # float32 math as unit_norm's few ops (F.rms_norm is about a tenth of a 16-bit decode step).
    root = shape.hidden_size**0.5
    if x.dtype == torch.float32:  # decided at trace time: no cast ops in a float32 graph
        return weight * (unit_norm(x, eps_root) * root)
    return weight * (unit_norm(x.float(), eps_root) * root).to(x.dtype)


def eps_term(shape: Shape) -> float:
    """RMSNorm's eps as unit_norm takes it: sqrt(hidden * eps)."""
    return (shape.hidden_size * shape.norm_eps) ** 0.5


def _eps_root(shape: Shape, for_cuda: bool, device: torch.device) -> torch.Tensor | None:
    """eps_term as a float32 tensor for torch.hypot; None where unused."""
    if shape.norm != "rms" or for_cuda:
        return None
    return torch.tensor(eps_term(shape), dtype=torch.float32, device=device)


def unit_norm(x: torch.Tensor, eps_root: torch.Tensor) -> torch.Tensor:
    """RMSNorm without its weight, divided by sqrt(hidden): x / sqrt(sum(x^2) + hidden * eps), eps_root being
    sqrt(hidden * eps). Three cheap ops; F.rms_norm costs about four times as much per call at decode."""
    return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), eps_root)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """RoPE (rotate-half form) on the first rotary_dim features of every head; sin has its sign folded in.

    The halves are swapped by a cat of two slices: TorchScript's CUDA fuser merges it with the products
    into one kernel, and on CPU it is what torch.roll does inside."""
    rot, rest = (x[..., :rotary_dim], x[..., rotary_dim:]) if rotary_dim < x.size(-1) else (x, None)
    half = rotary_dim // 2
    swapped = torch.cat([rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos + swapped * sin
    return out if rest is None else torch.cat([out, rest], dim=-1)


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Hide TorchScript's deprecation and tracer warnings: they concern torch's plans, not the user's chat
    (docs/backends.md says which torch versions work)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield
