"""chat's native CPU kernels (chat/native): the ops against torch's own, artifacts that call them, and the
fallback onto torch's kernels where the library is missing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chat import native

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(native.supported() is not None, reason=f"native kernels: {native.supported()}")


@pytest.fixture(scope="module")
def ops():
    """torch.ops.chat with the compiled kernels (built here if missing, as export does)."""
    if not native.load():
        pytest.fail(f"native kernels did not load: {native.why_not()}")
    return torch.ops.chat


@pytest.fixture(scope="module")
def python_fallback():
    """The ops as registered where the library is missing, defined beside the compiled ones: the library of
    torch.ops.chat_fallback, which stays defined while it lives."""
    return native.fallback_library("chat_fallback")


# Each form of the kernels, and (for tests that name it, by indirect parametrization) the Python fallback.
ALL_FORMS = ["widest", "avx2", "torch", "python"]


@pytest.fixture(params=["widest", "avx2", "torch"])
def kernels(request, ops, monkeypatch):
    """torch.ops.chat on each form of the kernels: the widest this CPU runs (AVX-512 here), AVX2, and torch's
    own kernels behind the same ops (CPUs with neither). $CHAT_NATIVE_ISA caps the form, read at each call.
    "python": the fallback's ops instead (python_fallback)."""
    if request.param == "python":
        return getattr(torch.ops, request.getfixturevalue("python_fallback").ns)
    if request.param != "widest":
        monkeypatch.setenv("CHAT_NATIVE_ISA", request.param)
    return ops


def assert_sums_close(got: torch.Tensor, w: torch.Tensor, x: torch.Tensor, r: torch.Tensor | None = None) -> None:
    """float32 w @ x (+ r) against the exact sums: summed in any order, each is within 2^-20 of the sum of its
    terms' sizes (a term lost or counted twice is not)."""
    exact, size = w.double() @ x.double(), w.double().abs() @ x.double().abs()
    if r is not None:
        exact, size = exact + r.double(), size + r.double().abs()
    assert got.dtype == torch.float32
    assert ((got.double() - exact).abs() <= size * 2**-20).all()


# Shapes with and without tails: rows not a multiple of 16 (some kernels add up 16 rows' totals at once),
# columns not a multiple of a vector.
SHAPES = [(3072, 576), (576, 1536), (37, 128), (7, 50), (13, 33), (1, 16), (5, 1)]
# The gated MLPs' first halves: each op with the activation of its gate, in torch's ops.
GATES = [("silu_mul_matvec", F.silu), ("gelu_tanh_mul_matvec", partial(F.gelu, approximate="tanh"))]


@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_matvec_float32_sums_within_rounding(kernels, rows, cols):
    torch.manual_seed(rows * cols)
    w, x, r = torch.randn(rows, cols), torch.randn(cols), torch.randn(rows)
    assert_sums_close(kernels.matvec(w, x), w, x)
    assert_sums_close(kernels.add_matvec(r, w, x), w, x, r)


@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_matvec_bfloat16_rounds_as_torch(kernels, rows, cols):
    """float32 sums rounded once to bfloat16 (as torch.mv's), and for add_matvec the product rounded before
    the add, as transformers' residual add of a layer's output: equal but for sums that land near a tie."""
    torch.manual_seed(rows + cols)
    w, x, r = (torch.randn(rows, cols).bfloat16(), torch.randn(cols).bfloat16(), torch.randn(rows).bfloat16())
    exact = (w.double() @ x.double()).bfloat16()
    got, expected = kernels.matvec(w, x), torch.mv(w, x)
    assert got.dtype == torch.bfloat16
    assert (got != expected).float().mean() < 0.01
    assert (got.double() - exact.double()).abs().max() <= (exact.double().abs().max() * 2**-7) + 1e-6
    summed = kernels.add_matvec(r, w, x)
    assert (summed != r + got).sum() == 0


@pytest.mark.parametrize(("rows", "cols"), [(3072, 576), (10, 33)])
def test_matvec_applies_the_rms_norm_when_given_its_eps_term(kernels, rows, cols):
    """float32 decode with folded norm weights: w @ (x / sqrt(sum(x^2) + eps_root^2)) in one op."""
    torch.manual_seed(cols)
    w, x, eps_root = torch.randn(rows, cols), torch.randn(cols) * 4, 0.3
    normed = x / torch.hypot(torch.linalg.vector_norm(x), torch.tensor(eps_root))
    torch.testing.assert_close(kernels.matvec(w, x, eps_root), torch.mv(w, normed), rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(kernels.matvec(w, x, None), torch.mv(w, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvec_applies_a_weighted_rms_norm_as_the_module_does(kernels, dtype):
    """With the norm's weight (the bfloat16 path): weight * (x / hypot(|x|, eps_root) * sqrt(k)), each step
    rounded to the dtype, as chat.lean.ops.rms_norm computes it in torch's ops."""
    torch.manual_seed(3)
    w, x, weight, eps_root = torch.randn(96, 64), torch.randn(64) * 3, torch.rand(64) + 0.5, 0.2
    w, x, weight = w.to(dtype), x.to(dtype), weight.to(dtype)
    unit = x.float() / torch.hypot(torch.linalg.vector_norm(x.float()), torch.tensor(eps_root))
    normed = weight * (unit * 8.0).to(dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(kernels.matvec(w, x, eps_root, weight), torch.mv(w, normed), **tolerance)
    gate, up = torch.mv(w, normed).chunk(2)
    for op, act in GATES:
        torch.testing.assert_close(getattr(kernels, op)(w, x, eps_root, weight), act(gate) * up, **tolerance)


@pytest.mark.parametrize("kernels", ALL_FORMS, indirect=True)
@pytest.mark.parametrize(("op", "act"), GATES)
@pytest.mark.parametrize(("rows", "cols"), [(3072, 576), (14, 33)])
def test_gated_matvec_is_a_gated_mlps_first_half(kernels, op, act, rows, cols):
    """float32 within summing order; bfloat16 rounded step by step as torch's ops: gate and up, act(gate),
    then the product (equal but for values that land near a tie)."""
    torch.manual_seed(rows)
    w, x, kernel = torch.randn(rows, cols) / 8, torch.randn(cols), getattr(kernels, op)
    gate, up = torch.mv(w, x).chunk(2)
    torch.testing.assert_close(kernel(w, x), act(gate) * up, rtol=1e-5, atol=1e-5)
    normed = x / torch.hypot(torch.linalg.vector_norm(x), torch.tensor(0.5))
    gate, up = torch.mv(w, normed).chunk(2)
    torch.testing.assert_close(kernel(w, x, 0.5), act(gate) * up, rtol=1e-5, atol=1e-5)
    wb, xb = w.bfloat16(), x.bfloat16()
    gate, up = torch.mv(wb, xb).chunk(2)
    got = kernel(wb, xb)
    assert got.dtype == torch.bfloat16 and (got != act(gate) * up).float().mean() < 0.01


@pytest.mark.parametrize("kernels", ALL_FORMS, indirect=True)
@pytest.mark.parametrize(("op", "act"), GATES)
def test_gate_activations_are_float32_accurate(kernels, op, act):
    """The vectorised exp and tanh over both of tanh's branches, its saturation and exp's overflow: gate = x,
    up = 1 (the last column of w and x), within 4 float32 ulps of act(x) (for gelu also of 0.5 |x|, which
    1 + tanh loses to cancellation, in torch's float32 as well)."""
    x = torch.cat([torch.linspace(-60, 60, 2001), torch.logspace(-8, 0, 50), -torch.logspace(-8, 0, 50)])
    n = x.numel()
    w = torch.zeros(2 * n, n + 1)
    w[:n, :n], w[n:, n] = torch.eye(n), 1.0
    got, exact = getattr(kernels, op)(w, torch.cat([x, torch.ones(1)])), act(x.double())
    size = exact.abs() + (0.5 * x.double().abs() if op == "gelu_tanh_mul_matvec" else 0.0)
    assert ((got.double() - exact).abs() <= size * 2**-21).all()


@pytest.mark.parametrize("op", [op for op, _ in GATES])
def test_gated_matvec_needs_an_even_number_of_rows(ops, op):
    with pytest.raises(RuntimeError, match=f"chat::{op}: w needs an even number of rows"):
        getattr(ops, op)(torch.randn(3, 16), torch.randn(16))


def int8_rows(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int8 weights over the whole range, and their rows' scales."""
    return torch.randint(-127, 128, (rows, cols), dtype=torch.int8), torch.rand(rows) / 64 + 1e-4


@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_int8_weights_are_summed_in_float32_then_scaled(kernels, rows, cols):
    torch.manual_seed(rows * cols + 1)
    (q, scales), x, r = int8_rows(rows, cols), torch.randn(cols), torch.randn(rows)
    whole = q.float() * scales[:, None]  # what the int8 rows stand for
    assert_sums_close(kernels.matvec(q, x, None, None, scales), whole, x)
    assert_sums_close(kernels.add_matvec(r, q, x, scales), whole, x, r)
    xb, rb = x.bfloat16(), r.bfloat16()
    got, exact = kernels.matvec(q, xb, None, None, scales), whole.double() @ xb.double()
    assert got.dtype == torch.bfloat16  # the activations' dtype
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    assert (kernels.add_matvec(rb, q, xb, scales) != rb + got).sum() == 0  # rounded product, then the add


@pytest.mark.parametrize(("op", "act"), GATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_gated_matvec_and_weighted_norm(kernels, op, act, dtype):
    torch.manual_seed(7)
    (q, scales), x, norm_weight = int8_rows(3072, 576), (torch.randn(576) / 16).to(dtype), torch.rand(576).to(dtype)
    gate, up = ((q.double() * scales.double()[:, None]) @ x.double()).chunk(2)
    exact = act(gate) * up
    got = getattr(kernels, op)(q, x, None, None, scales)
    # float32: within summing order; bfloat16: within its rounding of gate, act(gate) and the product
    bound = exact.abs().max() * (1e-5 if dtype == torch.float32 else 2**-6)
    assert got.dtype == dtype and (got.double() - exact).abs().max() <= bound
    # With a norm: the same as the norm taken first, then the int8 product.
    normed = kernels.matvec(torch.eye(576, dtype=dtype), x, 0.5, norm_weight)
    for name in ("matvec", op):
        kernel = getattr(kernels, name)
        torch.testing.assert_close(kernel(q, x, 0.5, norm_weight, scales), kernel(q, normed, None, None, scales))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_gives_the_weights_int8_rows_stand_for(kernels, dtype):
    q, scales = int8_rows(300, 77)
    got = kernels.dequantize(q, scales, torch.zeros(1, dtype=dtype))
    assert got.dtype == dtype and torch.equal(got, (q.float() * scales[:, None]).to(dtype))


def test_int8_weights_need_their_scales(ops):
    q, scales = int8_rows(8, 16)
    with pytest.raises(RuntimeError, match="int8 weights need their scales, float32, one per row"):
        ops.matvec(q, torch.randn(16))
    with pytest.raises(RuntimeError, match="int8 weights need their scales"):
        ops.add_matvec(torch.randn(8), q, torch.randn(16), scales[:4])
    with pytest.raises(RuntimeError, match="scales are for int8 and int4 weights only"):
        ops.matvec(torch.randn(8, 16), torch.randn(16), None, None, scales)


def int4_rows(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int4 rows (every level, two a byte) and their groups' steps and offsets, as export packs them."""
    packed = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8)
    groups = cols // 32
    steps, offsets = torch.rand(rows, groups) / 64 + 1e-4, -torch.rand(rows, groups) / 8
    return packed, torch.stack([steps, offsets], dim=1).half()


INT4_SHAPES = [(3072, 576), (576, 1536), (37, 128), (7, 64), (13, 128), (1, 192)]


@pytest.mark.parametrize(("rows", "cols"), INT4_SHAPES)
@pytest.mark.parametrize("kernels", ALL_FORMS, indirect=True)
def test_int4_weights_are_their_groups_levels_times_steps_plus_offsets(kernels, rows, cols):
    from chat.lean.ops import int4_weights

    torch.manual_seed(rows * cols + 2)
    (packed, scales), x, r = int4_rows(rows, cols), torch.randn(cols).bfloat16(), torch.randn(rows).bfloat16()
    whole = int4_weights(packed, scales)
    got, exact = kernels.matvec(packed, x, None, None, scales), whole.double() @ x.double()
    size = whole.double().abs() @ x.double().abs()
    assert got.dtype == torch.bfloat16  # the activations' dtype
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + size * 2**-18).all()
    assert (kernels.add_matvec(r, packed, x, scales) != r + got).sum() == 0  # rounded product, then the add


@pytest.mark.parametrize(("op", "act"), GATES)
@pytest.mark.parametrize("kernels", ALL_FORMS, indirect=True)
def test_int4_gated_matvec_and_weighted_norm(kernels, op, act):
    from chat.lean.ops import int4_weights

    torch.manual_seed(8)
    (packed, scales), x = int4_rows(3072, 576), (torch.randn(576) / 16).bfloat16()
    gate, up = (int4_weights(packed, scales).double() @ x.double()).chunk(2)
    exact = act(gate) * up
    got = getattr(kernels, op)(packed, x, None, None, scales)
    assert got.dtype == torch.bfloat16 and (got.double() - exact).abs().max() <= exact.abs().max() * 2**-6
    norm_weight = torch.rand(576).bfloat16()
    normed = kernels.matvec(torch.eye(576, dtype=torch.bfloat16), x, 0.5, norm_weight)
    for name in ("matvec", op):
        kernel = getattr(kernels, name)
        torch.testing.assert_close(
            kernel(packed, x, 0.5, norm_weight, scales), kernel(packed, normed, None, None, scales)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels", ALL_FORMS, indirect=True)
def test_dequantize_gives_the_weights_int4_rows_stand_for(kernels, dtype):
    from chat.lean.ops import int4_weights

    packed, scales = int4_rows(300, 192)
    got = kernels.dequantize(packed, scales, torch.zeros(1, dtype=dtype))
    assert got.dtype == dtype and torch.equal(got, int4_weights(packed, scales).to(dtype))


def test_int4_weights_need_their_steps_and_offsets(ops):
    packed, scales = int4_rows(8, 64)
    with pytest.raises(RuntimeError, match="int4 weights need their steps and offsets"):
        ops.matvec(packed, torch.randn(64).bfloat16())
    with pytest.raises(RuntimeError, match="int4 weights need their steps and offsets"):
        ops.matvec(packed, torch.randn(64).bfloat16(), None, None, scales.float())
    with pytest.raises(RuntimeError, match="int4 rows hold a multiple of 64 weights"):
        ops.matvec(packed[:, :16], torch.randn(32).bfloat16(), None, None, scales[:, :, :1])


def test_matvec_on_strided_input_and_other_dtypes_uses_torchs_kernels(ops):
    w, x = torch.randn(64, 48), torch.randn(64)
    torch.testing.assert_close(ops.matvec(w.t(), x), torch.mv(w.t(), x), rtol=1e-5, atol=1e-5)
    wd, xd = w.double(), torch.randn(48).double()
    torch.testing.assert_close(ops.matvec(wd, xd), torch.mv(wd, xd))


def reference_cache_attend(qkv, cos, sin, k_cache, v_cache, pos, n, scale=None, softcap=None, sliding_window=None):
    """What chat::cache_attend does, in torch's ops: RoPE in the caches' dtype, rounded as torch's ops round it
    (the caches updated in place), then attention in float64 over the keys transformers' masks let the token
    at n - 1 see: j < n, and with a sliding window W, (n - 1) - j < W."""
    kv_heads, d = k_cache.size(1), k_cache.size(3)
    heads = qkv.numel() // d - 2 * kv_heads
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d])

    def rope(x, count):
        x = x.reshape(count, d)
        if cos is None:
            return x
        rotary, half = cos.numel(), cos.numel() // 2
        r = x[:, :rotary]
        out = r * cos + torch.cat([r[:, half:], r[:, :half]], 1) * sin
        return torch.cat([out, x[:, rotary:]], 1)

    k_cache[0, :, pos] = rope(k, kv_heads)
    v_cache[0, :, pos] = v.reshape(kv_heads, d)
    q = rope(q, heads).double().reshape(1, kv_heads, heads // kv_heads, d)
    scores = q @ k_cache[:, :, :n].double().transpose(2, 3) * (d**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    seen = (n - 1) - torch.arange(n) < (sliding_window or n)
    return (scores.masked_fill(~seen, -torch.inf).softmax(-1) @ v_cache[:, :, :n].double()).reshape(-1)


def check_cache_attend(ops, dtype, heads, kv_heads, head_dim, rotary, pos, *options):
    """ops.cache_attend at pos against reference_cache_attend; options: scale, softcap, sliding_window, or none
    (the 7-argument call of graphs traced before them). float32 within summing order, bfloat16 within its
    rounding of the result; the caches as torch's ops would write them."""
    torch.manual_seed(pos + heads)
    qkv = torch.randn((heads + 2 * kv_heads) * head_dim).to(dtype)
    angles = torch.rand(rotary // 2) * 6
    cos = torch.cat([angles.cos(), angles.cos()]).to(dtype) if rotary else None
    sin = torch.cat([-angles.sin(), angles.sin()]).to(dtype) if rotary else None  # the sign folded in, as the tables
    k_cache, v_cache = torch.randn(2, 1, kv_heads, 1024, head_dim).to(dtype).unbind(0)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    got = ops.cache_attend(qkv, cos, sin, k_cache, v_cache, torch.tensor([pos]), torch.arange(pos + 1), *options)
    expected = reference_cache_attend(qkv, cos, sin, k_ref, v_ref, pos, pos + 1, *options)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert got.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 2**-8, "atol": 2**-8}
    torch.testing.assert_close(got.double(), expected, **tolerance)


@pytest.mark.parametrize("kernels", ALL_FORMS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos", [0, 5, 62, 63, 64, 199, 1000])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "rotary"), [(9, 3, 64, 64), (2, 2, 16, 16), (4, 1, 128, 64), (14, 2, 32, 0)]
)
def test_cache_attend(kernels, dtype, pos, heads, kv_heads, head_dim, rotary):
    """RoPE (whole or partial, or none), the cache write and attention over positions 0..pos, across the
    64-position work items' edges."""
    check_cache_attend(kernels, dtype, heads, kv_heads, head_dim, rotary, pos)


# (pos, sliding_window): windows of one position, and shorter than, as long as and longer than the filled
# cache, whose work items' edges count from the window's start.
WINDOWS = [(0, 1), (130, 1), (5, 4), (63, 64), (64, 64), (64, 65), (199, 100), (300, 129), (40, 4096), (150, None)]
# (scale, softcap): each alone and both, scores from tanh's polynomial range to its saturation (cap 1, |scores|
# up to about 100 at scale 4).
OPTIONS = [(None, None), (0.0625, None), (None, 2.0), (1.0, 5.0), (4.0, 1.0)]


@pytest.mark.parametrize("kernels", ALL_FORMS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "rotary"), [(8, 2, 64, 64), (4, 1, 128, 64)])
@pytest.mark.parametrize(("pos", "sliding_window"), WINDOWS)
@pytest.mark.parametrize(("scale", "softcap"), OPTIONS)
def test_cache_attend_with_scale_softcap_and_sliding_window(
    kernels, dtype, heads, kv_heads, head_dim, rotary, pos, sliding_window, scale, softcap
):
    """Gemma's and Granite's own score scale, Gemma 2's soft cap on the scores, and sliding windows."""
    check_cache_attend(kernels, dtype, heads, kv_heads, head_dim, rotary, pos, scale, softcap, sliding_window)


def test_cache_attend_refuses_a_window_or_cap_that_is_not_positive(ops):
    qkv, k_cache, v_cache = torch.randn(4 * 16), torch.zeros(1, 1, 8, 16), torch.zeros(1, 1, 8, 16)
    args = (qkv, None, None, k_cache, v_cache, torch.tensor([0]), torch.arange(1))
    with pytest.raises(RuntimeError, match="softcap must be positive"):
        ops.cache_attend(*args, None, 0.0)
    with pytest.raises(RuntimeError, match="sliding_window must be positive"):
        ops.cache_attend(*args, None, None, 0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript's, on torch's plans
def test_graphs_traced_before_the_options_still_run(ops, tmp_path):
    """A saved graph calls cache_attend with its first 7 arguments (TorchScript leaves out the defaults): the
    defaults of scale, softcap and sliding_window fill in the rest."""

    class Attend(torch.nn.Module):
        def forward(self, qkv, k_cache, v_cache, positions, window):
            return torch.ops.chat.cache_attend(qkv, None, None, k_cache, v_cache, positions, window)

    torch.jit.save(torch.jit.script(Attend()), tmp_path / "attend.pt")
    loaded = torch.jit.load(str(tmp_path / "attend.pt"))
    assert "ops.chat.cache_attend(qkv, None, None, k_cache, v_cache, positions, window)" in loaded.code
    qkv, (k_cache, v_cache) = torch.randn(6 * 32), torch.randn(2, 1, 2, 16, 32).unbind(0)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    got = loaded(qkv, k_cache, v_cache, torch.tensor([9]), torch.arange(10))
    torch.testing.assert_close(got.double(), reference_cache_attend(qkv, None, None, k_ref, v_ref, 9, 10))


def test_cache_attend_on_float16_uses_torchs_ops(ops):
    qkv, k_cache, v_cache = torch.randn(4 * 16).half(), torch.zeros(1, 1, 8, 16).half(), torch.zeros(1, 1, 8, 16).half()
    got = ops.cache_attend(qkv, None, None, k_cache, v_cache, torch.tensor([0]), torch.arange(1))
    torch.testing.assert_close(got, qkv[48:].repeat(2))  # one position: each query head gets its value
    assert torch.equal(k_cache[0, 0, 0], qkv[32:48]) and torch.equal(v_cache[0, 0, 0], qkv[48:])


def test_export_calls_the_ops_and_lists_them(llama_artifact, ops):
    manifest = json.loads((llama_artifact / "chat-artifact.json").read_text())
    assert manifest["ops"] == ["chat"]
    from chat.lean.ops import quiet_torchscript

    with quiet_torchscript():  # inlined: the layers' submodules make the calls
        graph = str(torch.jit.load(str(llama_artifact / "model.ts")).decode.inlined_graph)
    for op in ("matvec", "silu_mul_matvec", "add_matvec", "cache_attend"):
        assert f"chat::{op}(" in graph


def run_python(code: str, *args: object, **env: str) -> subprocess.CompletedProcess:
    """`code` in a Python of its own (chat.native's state is per process), with `env` added; it must succeed."""
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done


FALLBACK_RUN = """
import sys, torch
from chat import native
from chat.backends.torchscript_backend import TorchScriptBackend
backend = TorchScriptBackend(sys.argv[1])
logits = backend.prefill([5, 6, 7, 8])
for token in (9, 10, 11):
    logits = backend.decode(token)
print("native" if native.load() else "fallback")
print("NOTES", backend.info.notes)
torch.save(logits, sys.argv[2])
"""


@pytest.mark.parametrize("artifact", ["llama_artifact", "int8_artifact"])
def test_without_the_library_the_artifact_runs_on_torchs_kernels_and_says_so(request, artifact, ops, tmp_path):
    """A library that cannot be built (a broken compiler) costs speed, not the chat: same logits, one note."""
    logits = {}
    for kind, env in (
        ("native", {"CHAT_NATIVE_DIR": str(native.find_library().parent)}),
        ("fallback", {"CHAT_NATIVE_DIR": str(tmp_path / "empty"), "CXX": "/bin/false"}),
    ):
        out = tmp_path / f"{kind}.pt"
        done = run_python(FALLBACK_RUN, request.getfixturevalue(artifact), out, **env)
        assert done.stdout.splitlines()[0] == kind
        if kind == "fallback":
            notes = done.stdout.splitlines()[1]
            assert "building chat's native kernels failed" in notes and "torch's own kernels" in notes
            assert notes.count("', '") == 0  # one note
        else:
            assert "NOTES []" in done.stdout
        logits[kind] = torch.load(out)
    torch.testing.assert_close(logits["native"], logits["fallback"], rtol=1e-4, atol=1e-4)


def test_a_manifest_naming_unknown_ops_is_refused(llama_artifact, tmp_path):
    import shutil

    from chat.artifact import ArtifactError, read_manifest

    copy = tmp_path / "foreign"
    shutil.copytree(llama_artifact, copy)
    path = copy / "chat-artifact.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "ops": ["chat", "someone_elses"]}))
    with pytest.raises(ArtifactError, match="needs ops this chat does not provide"):
        read_manifest(copy)


EXPORT_WITHOUT_COMPILER = """
import sys
from chat.export import export
export(sys.argv[1], sys.argv[2], max_len=64, progress=print)
"""


def test_without_a_compiler_export_uses_torchs_ops_and_says_why(tiny_llama, tmp_path):
    """No library and no g++: the artifact is exported on torch's ops alone (no "ops" needed to load it)."""
    out = tmp_path / "ts"
    done = run_python(
        EXPORT_WITHOUT_COMPILER, tiny_llama, out, CHAT_NATIVE_DIR=str(tmp_path / "empty"), CXX="/bin/false"
    )
    assert "decode on torch's kernels: building chat's native kernels failed" in done.stdout
    assert json.loads((out / "chat-artifact.json").read_text())["ops"] == []


@pytest.mark.parametrize(("cap", "kernels"), [(None, "widest"), ("avx2", "native AVX2"), ("torch", "")])
def test_status_says_which_kernels_run_the_model(llama_artifact, ops, monkeypatch, cap, kernels):
    from chat.backends.torchscript_backend import TorchScriptBackend
    from chat.local import describe_device

    if cap is not None:
        monkeypatch.setenv("CHAT_NATIVE_ISA", cap)
    if kernels == "widest":  # read here: the module is skipped (not imported to fail) off Linux
        kernels = "native AVX-512" if "avx512f" in Path("/proc/cpuinfo").read_text().split() else "native AVX2"
    info = TorchScriptBackend(llama_artifact).info
    assert info.kernels == kernels
    if kernels:
        assert info.notes == [] and describe_device(info).startswith(f"cpu, float32, {kernels} kernels, ")
    else:  # a CPU with neither: torch's kernels behind the ops, said in a note
        assert describe_device(info).startswith("cpu, float32, ") and "neither AVX2 nor AVX-512" in info.notes[0]


def test_build_command_bad_input_is_one_line(tmp_path):
    """An unwritable --into and an unknown option: one line each, exit 1 and 2, no traceback."""
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    for argv, code, words in (
        ([f"--into={blocked / 'lib'}"], 1, "cannot write in"),
        (["--bogus"], 2, "only the options --help lists"),
    ):
        done = subprocess.run([sys.executable, "-m", "chat.native", *argv], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == code, done.stderr
        assert words in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) <= 2  # the "building" line, then the error


def run_chat(artifact: Path, *, home: Path, **env: str) -> subprocess.CompletedProcess:
    """The chat itself on `artifact`, fed a message and !status on stdin (no terminal), with a HOME of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "chat", str(artifact), "--temperature=0", "--max-new-tokens=3", "--no-autosave"],
        input="Hello\n!status\n",
        env={**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), **env},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def chat_built(llama_artifact, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """A chat with a fresh HOME and an empty library directory (the test session's one real build)."""
    home, directory = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("native")
    return run_chat(llama_artifact, home=home, CHAT_NATIVE_DIR=str(directory)), directory


def test_a_chat_builds_missing_kernels_once_and_decodes_on_them(chat_built, llama_artifact, tmp_path):
    done, directory = chat_built
    assert re.search(
        rf"built chat's native CPU kernels once \(\d+\.\d s\) into {re.escape(str(directory))}", done.stderr
    )
    assert re.search(r"device +cpu, float32, native AVX(-512|2) kernels, ", done.stdout)
    assert "torch's" not in done.stderr
    built = directory / native.library_name()
    assert torch.__version__.replace("+", "_") in built.name and built.is_file()
    assert not list(directory.glob(".chat_native-*"))  # no partial file left behind
    assert built.stat().st_mode & 0o044 == 0o044  # readable by other users (a shared install's, the image's)
    # The next chat, and python -m chat.native, find it: no second build.
    again = run_chat(llama_artifact, home=tmp_path, CHAT_NATIVE_DIR=str(directory))
    assert "built chat's native" not in again.stderr and "native AVX" in again.stdout
    command = [sys.executable, "-m", "chat.native", f"--into={directory}"]
    found = subprocess.run(
        command, env={**os.environ, "CHAT_NATIVE_DIR": str(directory)}, capture_output=True, text=True
    )
    assert found.returncode == 0 and found.stdout.strip() == str(built) and "building" not in found.stderr


def test_without_a_compiler_a_chat_says_in_one_line_how_to_get_one(llama_artifact, tmp_path):
    """No g++ or c++ on PATH and no $CXX: the chat answers on torch's kernels, after one line on what to install."""
    env = {key: value for key, value in os.environ.items() if key != "CXX"}
    (tmp_path / "bin").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "chat", str(llama_artifact), "--temperature=0", "--max-new-tokens=3", "--no-autosave"],
        input="Hello\n!status\n",
        env={**env, "PATH": str(tmp_path / "bin"), "HOME": str(tmp_path), "CHAT_NATIVE_DIR": str(tmp_path / "lib")},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines() == [
        "decoding on torch's kernels, slower: install a C++ compiler (apt install g++) and chat builds its own"
    ]
    assert re.search(r"device +cpu, float32, \d+ threads?", done.stdout)  # torch's kernels: no "native"
    assert re.search(r"last reply +prompt \d+ tok, reply [1-9]\d* tok", done.stdout)  # it answered


LOAD_AND_SAY = """
from chat import native
print("native" if native.load() else native.why_not(), repr(native.take_built_note()))
"""


def test_a_build_waits_for_one_under_way_and_uses_its_library(chat_built, tmp_path):
    """Two chats missing the library: the second waits on the first's lock, then loads what it built (a
    private file renamed into place whole), without compiling its own."""
    import fcntl
    import shutil

    lock = os.open(tmp_path / ".chat_native.lock", os.O_RDONLY | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # this test is the first chat, building
    waiting = subprocess.Popen(
        [sys.executable, "-c", LOAD_AND_SAY],
        env={**os.environ, "CHAT_NATIVE_DIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        while f"-> FLOCK  ADVISORY  WRITE {waiting.pid} " not in Path("/proc/locks").read_text():
            assert waiting.poll() is None and time.monotonic() < deadline, "the second build did not wait"
            time.sleep(0.1)
        target = tmp_path / native.library_name()
        shutil.copy(chat_built[1] / native.library_name(), tmp_path / ".partial")
        os.replace(tmp_path / ".partial", target)
        inode = target.stat().st_ino
    finally:
        os.close(lock)
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err
    assert out.split() == ["native", "''"]  # loaded, and built nothing itself
    assert target.stat().st_ino == inode
