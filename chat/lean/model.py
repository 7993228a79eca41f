"""The lean decoder that export traces: one module for every supported family, built from its weights.

Per layer: one matmul for q/k/v and one for gate/up, RoPE from precomputed tables, RMSNorm in float32 and a KV
cache held in the module (chat.lean.attention). `build` picks each part's form once, for the device, dtype
and kernels (Forms): on CPU in float32 the forms with the fewest ops per token (norm weights folded into the
next matmul, residual adds inside addmv/addmm, one token's RoPE as one small matmul); where chat's native
kernels are built, decode on them (five ops a llama layer); on CUDA the fused norms and attention over a
masked bucket of the cache, so that a CUDA graph per bucket can replay the step. A family's traits are data
in its Shape (chat.lean.shape): norm kind and placement, activation, q/k norms, soft-caps, scales,
sliding windows, RoPE per layer.

Every method takes 1-D tensors: `ids` and `positions` of the new tokens and `window`, the key positions
0..W-1 (a view of an arange the caller keeps), whose length is traced as a dynamic size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chat.lean import attention as attn
from chat.lean import layers as L
from chat.lean.ops import softcap
from chat.lean.shape import Shape

Weights = dict[str, torch.Tensor | None]
RopeTable = tuple[torch.Tensor, torch.Tensor]  # cos and signed sin (rotate-half form), a row per position
MATMUL_WEIGHTS = ("wqkv", "wo", "wup", "wdown")  # a layer's; rounded with --quantize, as is the output head


@dataclass(frozen=True)
class Forms:
    """How a module runs, chosen once when it is built (see forms_for)."""

    cuda: bool = False  # fused norms; decode attends over a masked bucket of the cache (CUDA graphs)
    native: bool = False  # CPU decode on chat's native kernels
    fewest_ops: bool = False  # CPU float32: folded norms, adds inside matmuls, RoPE as a matmul
    transposed: frozenset[str] = frozenset()  # weights stored (in, out) (see TransposedLinear)


def forms_for(shape: Shape, dtype: torch.dtype, device: torch.device, native: bool) -> Forms:
    """bfloat16 is bound by its matmuls, and 16-bit keeps transformers' rounding; float32's matrix-vector
    products leave a layer's small ops a measurable share of a token, so float32 takes the fewest ops."""
    if device.type == "cuda":
        return Forms(cuda=True)
    float32 = dtype == torch.float32
    transposed: set[str] = set()
    if float32 and not native:  # the weights whose output is wider than their input
        inner = shape.heads * shape.head_dim
        wide = {
            "wqkv": inner + 2 * shape.kv_heads * shape.head_dim > shape.hidden_size,
            "wo": shape.hidden_size > inner,
            "wup": True,
            "lm_head": True,
        }
        transposed = {name for name, is_wide in wide.items() if is_wide}
    return Forms(native=native, fewest_ops=float32, transposed=frozenset(transposed))


# --- RoPE tables: rows(positions, one) gives what Attention applies ---


class Rope(nn.Module):
    def __init__(self, table: RopeTable):
        super().__init__()
        self.register_buffer("cos", table[0])
        self.register_buffer("sin", table[1])

    def rows(self, positions: torch.Tensor, one: bool) -> attn.Rope:
        return self.cos.index_select(0, positions).unsqueeze(1), self.sin.index_select(0, positions).unsqueeze(1)


class NativeRope(Rope):
    """One token's rows themselves, for chat::cache_attend."""

    def rows(self, positions: torch.Tensor, one: bool) -> attn.Rope:
        if one:
            return self.cos.index_select(0, positions)[0], self.sin.index_select(0, positions)[0]
        return super().rows(positions, one)


class MatrixRope(Rope):
    """One token's RoPE as a matmul by a matrix made once per step: diag(cos) + swap * sin, swap[j, i] = 1 where
    j = i +- head_dim / 2 (the rotate-half pairs). One op per layer instead of four (CPU float32)."""

    def __init__(self, table: RopeTable):
        super().__init__(table)
        d = table[0].shape[-1]
        self.register_buffer("swap", torch.eye(d, dtype=table[0].dtype, device=table[0].device).roll(d // 2, 0))

    def rows(self, positions: torch.Tensor, one: bool) -> attn.Rope:
        cos, sin = super().rows(positions, one)
        if one:
            return torch.diag(cos[0, 0]) + self.swap * sin[0]
        return cos, sin


# --- the ends of the model ---


class Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor, positions: torch.Tensor | None, scale: torch.Tensor | float | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("positions", positions)  # learned absolute positions (GPT-2)
        self.scale = scale  # Gemma's (a tensor in the model's dtype), Granite's (a float)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.lookup(ids)
        if self.positions is not None:
            x = x + F.embedding(positions, self.positions)
        return x if self.scale is None else x * self.scale

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class ColumnEmbedding(Embedding):
    """A tied embedding kept once as the transposed head's (hidden, vocab) weight: tokens are its columns."""

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.index_select(1, ids).t()


class Int8RowEmbedding(Embedding):
    """A tied embedding kept once as the int8 head's rows and scales: a token's row is made whole on lookup,
    to the same values the embedding held (the exporter rounds a tied embedding with its head)."""

    def __init__(
        self,
        head: L.NativeQuantizedLinear,
        positions: torch.Tensor | None,
        scale: torch.Tensor | float | None,
        dtype: torch.dtype,
    ):
        super().__init__(head.weight, positions, scale)
        self.register_buffer("rows_scale", head.scale)
        self.dtype = dtype

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight.index_select(0, ids).float() * self.rows_scale.index_select(0, ids).unsqueeze(1)
        return rows.to(self.dtype)


class Head(nn.Module):
    """Final norm and output product; Granite divides the logits, Gemma 2 soft-caps them."""

    def __init__(self, proj: L.NormedLinear, divisor: float, cap: float):
        super().__init__()
        self.proj = proj
        self.divisor = divisor
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.proj(x)
        if self.divisor != 1.0:
            logits = logits / self.divisor
        return logits if not self.cap else softcap(logits, self.cap)


# --- masks: additive, in the model's dtype, made once per step for each window size ---


class Masks(nn.Module):
    """CPU: a decode step of a full-attention layer reads exactly the filled prefix, unmasked."""

    def __init__(self, shape: Shape, dtype: torch.dtype):
        super().__init__()
        self.windows = sorted(set(shape.windows))
        self.groups = shape.heads // shape.kv_heads
        self.dtype = dtype

    def prefill(self, positions: torch.Tensor, window: torch.Tensor) -> dict[int, torch.Tensor | None]:
        keys, queries = window.unsqueeze(0), positions.unsqueeze(1)
        masks: dict[int, torch.Tensor | None] = {}
        for w in self.windows:
            seen = keys <= queries
            if w:
                seen = seen & (keys > queries - w)
            # Rows as the grouped queries lie: (groups * tokens, keys).
            masks[w] = self._additive(seen).repeat(self.groups, 1)
        return masks

    def decode(self, positions: torch.Tensor, window: torch.Tensor) -> dict[int, torch.Tensor | None]:
        return {w: self._additive(window > positions - w).unsqueeze(0) if w else None for w in self.windows}

    def _additive(self, seen: torch.Tensor) -> torch.Tensor:
        return torch.where(seen, 0.0, float("-inf")).to(self.dtype)


class BucketMasks(Masks):
    """CUDA: decode attends over a bucket of the cache, masked past the token."""

    def decode(self, positions: torch.Tensor, window: torch.Tensor) -> dict[int, torch.Tensor | None]:
        masks: dict[int, torch.Tensor | None] = {}
        for w in self.windows:
            seen = window <= positions
            if w:
                seen = seen & (window > positions - w)
            masks[w] = self._additive(seen).unsqueeze(0)
        return masks


# --- a layer and the model ---


class Block(nn.Module):
    def __init__(self, attention: attn.Attention, attention_out: nn.Module, mlp: nn.Module, mlp_out: nn.Module):
        super().__init__()
        self.attention = attention
        self.attention_out = attention_out  # o_proj and the residual add
        self.mlp = mlp
        self.mlp_out = mlp_out  # down_proj and the residual add

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        window: torch.Tensor,
        ropes: list[attn.Rope],
        masks: dict[int, torch.Tensor | None],
    ) -> torch.Tensor:
        x = self.attention_out(x, self.attention(x, positions, window, ropes, masks))
        return self.mlp_out(x, self.mlp(x))


class LeanLM(nn.Module):
    def __init__(
        self,
        shape: Shape,
        embedding: Embedding,
        ropes: list[Rope],
        blocks: list[Block],
        head: Head,
        masks: Masks,
    ):
        super().__init__()
        self.shape = shape
        self.embedding = embedding
        self.ropes = nn.ModuleList(ropes)
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.masks = masks

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Run a chunk of tokens at `positions` (the keys are `window`, up to the chunk's end); last logits."""
        return self._run(ids, positions, window, self.masks.prefill(positions, window), one=False)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """One token; on CPU `window` is exactly the filled prefix, on CUDA a bucket masked past the token."""
        return self._run(ids, positions, window, self.masks.decode(positions, window), one=True)

    def _run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        window: torch.Tensor,
        masks: dict[int, torch.Tensor | None],
        one: bool,
    ) -> torch.Tensor:
        x = self.embedding(ids, positions)
        x = x[0] if one else x
        ropes = [table.rows(positions, one) for table in self.ropes]
        for block in self.blocks:
            x = block(x, positions, window, ropes, masks)
        return self.head(x if one else x[-1])


# --- building: every form chosen here, once ---


def build(
    shape: Shape, top: Weights, layers: list[Weights], ropes: list[RopeTable], forms: Forms, dtype: torch.dtype
) -> LeanLM:
    """The module of converted weights (chat.export.families), already in their dtype and on their device."""
    rope_kind = Rope
    if forms.native:
        rope_kind = NativeRope
    elif forms.fewest_ops and shape.rotary_dim == shape.head_dim:
        rope_kind = MatrixRope
    embed, head_weight = top["embed"], top["lm_head"]
    tied = head_weight is None
    if tied:
        head_weight = embed
    head_linear = _linear("lm_head", head_weight, None, top.get("lm_head_scale"), forms)
    embed_scale = _embed_scale(shape, dtype, head_linear.weight.device)
    if embed is None:  # quantized, tied: the int8 head holds it (chat.export.quantize)
        assert isinstance(head_linear, L.NativeQuantizedLinear)
        embedding = Int8RowEmbedding(head_linear, top["pos_embed"], embed_scale, dtype)
    elif isinstance(head_linear, L.TransposedLinear) and tied:  # keep one (hidden, vocab) copy
        embedding = ColumnEmbedding(head_linear.weight, top["pos_embed"], embed_scale)
    else:
        embedding = Embedding(embed, top["pos_embed"], embed_scale)
    final_norm = _norm(shape, top["norm_w"], top["norm_b"], forms)
    head = Head(_normed(final_norm, head_linear, forms), shape.logits_divisor, shape.final_softcap)
    blocks = [_block(shape, w, i, forms) for i, w in enumerate(layers)]
    masks = BucketMasks(shape, dtype) if forms.cuda else Masks(shape, dtype)
    return LeanLM(shape, embedding, [rope_kind(t) for t in ropes], blocks, head, masks)


def _block(shape: Shape, w: Weights, layer: int, forms: Forms) -> Block:
    quantized = w.get("wqkv_scale") is not None
    # Quantized weights hold the rounded weights as transformers would run them (see chat.export.quantize).
    fold = forms.fewest_ops and shape.norm == "rms" and shape.norm_placement != "post" and not quantized
    if fold:  # the norm weight and sqrt(hidden) scale the matmul's inputs: into the weight's columns
        root = shape.hidden_size**0.5
        w = dict(w, wqkv=w["wqkv"] * (w["ln1"] * root), wup=w["wup"] * (w["ln2"] * root))
    ln1 = _norm(shape, w["ln1"], w.get("ln1_b"), forms, folded=fold)
    ln2 = _norm(shape, w["ln2"], w.get("ln2_b"), forms, folded=fold)

    qkv = _normed(ln1, _linear("wqkv", w["wqkv"], w["bqkv"], w.get("wqkv_scale"), forms), forms)
    qk_norm = None
    if shape.qk_norm:
        qk_norm = attn.QKNorm(shape, _norm(shape, w["q_norm"], None, forms), _norm(shape, w["k_norm"], None, forms))
    scale = shape.attn_scale or None
    weigh = attn.SoftcappedWeigh(scale, shape.attn_softcap, shape.head_dim) if shape.attn_softcap else attn.Weigh(scale)
    kind = attn.NativeAttention if forms.native else attn.Attention
    attention = kind(shape, qkv, qk_norm, weigh, layer)

    up = _normed(ln2, _linear("wup", w["wup"], w["bup"], w.get("wup_scale"), forms), forms)
    if shape.mlp == "plain":
        mlp: nn.Module = L.PlainMLP(up)
    else:
        gate = L.silu_mul_out_of_place if forms.cuda and shape.activation == "silu" else L.GATES[shape.activation]
        native_gate = forms.native and w["bup"] is None
        mlp = L.NativeGatedMLP(up, gate, shape.activation) if native_gate else L.GatedMLP(up, gate)
    o = _linear("wo", w["wo"], w["bo"], w.get("wo_scale"), forms)
    down = _linear("wdown", w["wdown"], w["bdown"], w.get("wdown_scale"), forms)
    return Block(
        attention,
        _residual(shape, o, w.get("post_attn_norm"), forms),
        mlp,
        _residual(shape, down, w.get("post_mlp_norm"), forms),
    )


def _residual(shape: Shape, out: nn.Module, post_norm: torch.Tensor | None, forms: Forms) -> nn.Module:
    if post_norm is not None:
        return L.NormedResidual(out, _norm(shape, post_norm, None, forms))
    if shape.residual_scale != 1.0:
        return L.ScaledResidual(out, shape.residual_scale)
    return L.Residual(out)


def _norm(
    shape: Shape, weight: torch.Tensor | None, bias: torch.Tensor | None, forms: Forms, folded: bool = False
) -> nn.Module:
    if weight is None:
        return L.NoNorm()
    if shape.norm == "layer":
        return L.LayerNorm(weight, bias, shape.norm_eps)
    if shape.norm == "rms_offset":
        return L.Float32RMSNorm(1.0 + weight.float(), shape.norm_eps)
    if shape.norm == "rms_float":
        return L.Float32RMSNorm(weight, shape.norm_eps)
    if folded:
        return L.FoldedRMSNorm(weight.numel(), shape.norm_eps, weight.device)
    return L.FusedRMSNorm(weight, shape.norm_eps) if forms.cuda else L.RMSNorm(weight, shape.norm_eps)


def _normed(norm: nn.Module, linear: nn.Module, forms: Forms) -> L.NormedLinear:
    if forms.native and isinstance(norm, (L.RMSNorm, L.FoldedRMSNorm)):
        return L.NativeNormedLinear(norm, linear)
    return L.NormedLinear(norm, linear)


def _linear(
    name: str, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None, forms: Forms
) -> nn.Module:
    if scale is not None:
        return L.NativeQuantizedLinear(weight, scale, bias)
    if forms.native:
        return L.NativeAddmmLinear(weight, bias) if forms.fewest_ops else L.NativeLinear(weight, bias)
    if name in forms.transposed:
        return L.TransposedLinear(weight.t().contiguous(), bias)
    if forms.fewest_ops and bias is None:
        return L.AddInMatmulLinear(weight, bias)
    return L.Linear(weight, bias)


def _embed_scale(shape: Shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor | float | None:
    if shape.embed_scale == 1.0:
        return None
    if shape.embed_scale_in_dtype:
        return torch.tensor(shape.embed_scale, dtype=dtype, device=device)
    return shape.embed_scale
