"""A candidate CUDA decode step from fused Triton kernels, for the A/B in gpu_experiments.py (`triton_fused`).

Under CUDA graphs a decode step of a small model costs its kernel count, not its bytes: the exported llama
decode runs about 14 kernels a layer. Here a layer is five kernels (six in buckets above SINGLE_PASS_MAX
slots: attention's split pass and its reduction), from four `chat_triton::` custom ops that torch.jit.trace
records and a loaded artifact calls (import this module before torch.jit.load):

  qkv_rope    RMSNorm (1/rms from x inside, the norm weight applied to x) + the q/k/v matrix-vector
              product + RoPE on q and k + k and v written into the caches at pos; returns q
  attend      attention of each query head (GQA: its kv head is head // groups) over cache slots 0..pos
              only, online softmax in float32. pos is read on the device, and the cache bucket (window)
              picks the launch when the op runs, i.e. when each bucket's CUDA graph is captured: up to
              SINGLE_PASS_MAX slots one program per head walks 0..pos; above, flash-decoding: programs
              (head, chunk of SPLIT_CHUNK slots) write partial softmax sums, a second kernel combines them
  add_matvec  x + W @ h, twice: attention output (wo) and MLP output (wdown)
  gated_mlp   RMSNorm + the gate/up product + silu(gate) * up

plus the embedding, the final norm and the output head as aten ops: 5 (or 6) * layers + 3 kernels a step.
Every kernel reads the token's position from a device tensor, allocates nothing itself (attention's partial
sums are a torch buffer) and launches on torch's current stream, so a bucket's capture replays any step in it.
Products accumulate in float32; q, the attention output and the MLP activation stay float32 between kernels;
the residual stream and the caches keep the model's dtype, as in the exported module.

It is a candidate only: it becomes exporter code if it wins on the GPU. fused_decode() patches the exporter
(prefill is unchanged; other families, biases and partial RoPE keep the exported decode). Without a GPU the
kernels run on CPU tensors under TRITON_INTERPRET=1 (experiments/test_triton_decode.py).
"""

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from chat.export.model import LeanLM

PAIRS = 4  # qkv_rope: rotate-half pairs (2 rows each) per program
ROWS = 8  # add_matvec and gated_mlp: output rows (gated_mlp: gate and up rows each) per program
MAX_BLOCK_K = 128  # input features per loop step of a matrix-vector product
BLOCK_T = 64  # cache slots per loop step of single-pass attention
# Buckets of up to SINGLE_PASS_MAX slots: at most 4 steps of one program per head. Longer ones split the slots
# into chunks, one program each, since 9 programs walking ~1000 slots leave the GPU idle; a chunk of 128 is one
# load of keys and one of values per program, and 8 chunks a head (72 programs) for the 1024-slot bucket.
SINGLE_PASS_MAX = 256
SPLIT_CHUNK = 128
REDUCE_BLOCK = 16  # chunks combined per loop step of the reduction (2048 slots)


@triton.jit
def _normed_matvec_pair(
    x_ptr,
    norm_ptr,
    w_ptr,
    rows_a,
    rows_b,
    row_mask,
    eps,
    HIDDEN: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(W[rows_a] @ n, W[rows_b] @ n) in float32 (ROWS rows each), n = RMSNorm(x) * norm weight; W is (out, HIDDEN).

    1/rms is a scalar, so it multiplies the sums at the end and the sum of squares rides on the same loop."""
    acc_a = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, HIDDEN, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_mask = k < HIDDEN
        x = tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        squares += x * x
        xg = (x * tl.load(norm_ptr + k, mask=k_mask, other=0.0).to(tl.float32))[None, :]
        mask = row_mask[:, None] & k_mask[None, :]
        acc_a += tl.load(w_ptr + rows_a[:, None] * HIDDEN + k[None, :], mask=mask, other=0.0).to(tl.float32) * xg
        acc_b += tl.load(w_ptr + rows_b[:, None] * HIDDEN + k[None, :], mask=mask, other=0.0).to(tl.float32) * xg
    inv_rms = tl.rsqrt(tl.sum(squares, 0) / HIDDEN + eps)
    return tl.sum(acc_a, 1) * inv_rms, tl.sum(acc_b, 1) * inv_rms


@triton.jit
def _qkv_rope_kernel(
    x_ptr,
    norm_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    cache_len,
    eps,
    HIDDEN: tl.constexpr,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Program: PAIRS features j of the first half of one head (q, then k, then v heads) and their rotate-half
    # partners j + HALF, so RoPE needs nothing from another program.
    HALF: tl.constexpr = HEAD_DIM // 2
    pid = tl.program_id(0)
    head = pid // (HALF // PAIRS)
    j = (pid % (HALF // PAIRS)) * PAIRS + tl.arange(0, PAIRS)
    rows = head * HEAD_DIM + j
    all_rows = j < HALF
    lo, hi = _normed_matvec_pair(x_ptr, norm_ptr, w_ptr, rows, rows + HALF, all_rows, eps, HIDDEN, PAIRS, BLOCK_K)
    pos = tl.load(pos_ptr)
    # The table's sin has the rotate-half sign folded in (chat.export.families._rope_table).
    cos_lo = tl.load(cos_ptr + pos * HEAD_DIM + j).to(tl.float32)
    cos_hi = tl.load(cos_ptr + pos * HEAD_DIM + j + HALF).to(tl.float32)
    sin_lo = tl.load(sin_ptr + pos * HEAD_DIM + j).to(tl.float32)
    sin_hi = tl.load(sin_ptr + pos * HEAD_DIM + j + HALF).to(tl.float32)
    rotated = head < HEADS + KV_HEADS  # v heads pass through
    out_lo = tl.where(rotated, lo * cos_lo + hi * sin_lo, lo)
    out_hi = tl.where(rotated, hi * cos_hi + lo * sin_hi, hi)
    # Masks pick the destination; the caches are (1, KV_HEADS, cache_len, HEAD_DIM), contiguous.
    is_q = all_rows & (head < HEADS)
    tl.store(q_ptr + rows, out_lo, mask=is_q)
    tl.store(q_ptr + rows + HALF, out_hi, mask=is_q)
    is_k = all_rows & (head >= HEADS) & rotated
    slot = ((head - HEADS) * cache_len + pos) * HEAD_DIM + j
    tl.store(k_cache_ptr + slot, out_lo.to(k_cache_ptr.dtype.element_ty), mask=is_k)
    tl.store(k_cache_ptr + slot + HALF, out_hi.to(k_cache_ptr.dtype.element_ty), mask=is_k)
    is_v = all_rows & (head >= HEADS + KV_HEADS)
    slot = ((head - HEADS - KV_HEADS) * cache_len + pos) * HEAD_DIM + j
    tl.store(v_cache_ptr + slot, out_lo.to(v_cache_ptr.dtype.element_ty), mask=is_v)
    tl.store(v_cache_ptr + slot + HALF, out_hi.to(v_cache_ptr.dtype.element_ty), mask=is_v)


@triton.jit
def _attend_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    pos_ptr,
    out_ptr,
    cache_len,
    scale,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    head = tl.program_id(0)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + head * HEAD_DIM + d) * scale
    pos = tl.load(pos_ptr)
    base = (head // GROUPS) * cache_len * HEAD_DIM
    best = -float("inf")  # running max of the scores, their exp-sum, and the weighted sum of values
    total = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start in range(0, pos + 1, BLOCK_T):  # slot 0 is always in the first step: best is finite after it
        t = start + tl.arange(0, BLOCK_T)
        valid = t <= pos
        offsets = base + t[:, None] * HEAD_DIM + d[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.where(valid, tl.sum(k * q[None, :], 1), -float("inf"))
        new_best = tl.maximum(best, tl.max(scores, 0))
        shrink = tl.exp(best - new_best)
        p = tl.exp(scores - new_best)
        v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * shrink + tl.sum(p[:, None] * v, 0)
        total = total * shrink + tl.sum(p, 0)
        best = new_best
    tl.store(out_ptr + head * HEAD_DIM + d, acc / total)


@triton.jit
def _attend_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    pos_ptr,
    max_ptr,
    sum_ptr,
    acc_ptr,
    cache_len,
    scale,
    SPLITS: tl.constexpr,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # Program: one query head over its chunk of slots, cut at pos. A chunk wholly past pos writes sums 0;
    # the reduction does not read it anyway (its loop stops at pos's chunk).
    head = tl.program_id(0)
    split = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + head * HEAD_DIM + d) * scale
    pos = tl.load(pos_ptr)
    t = split * CHUNK + tl.arange(0, CHUNK)
    valid = t <= pos
    offsets = (head // GROUPS) * cache_len * HEAD_DIM + t[:, None] * HEAD_DIM + d[None, :]
    k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
    scores = tl.where(valid, tl.sum(k * q[None, :], 1), -float("inf"))
    best = tl.max(scores, 0)
    best = tl.where(best == -float("inf"), 0.0, best)  # an empty chunk: no -inf - -inf (nan) below
    p = tl.exp(scores - best)  # 0 past pos
    v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
    at = head * SPLITS + split
    tl.store(max_ptr + at, best)
    tl.store(sum_ptr + at, tl.sum(p, 0))
    tl.store(acc_ptr + at * HEAD_DIM + d, tl.sum(p[:, None] * v, 0))


@triton.jit
def _attend_reduce_kernel(
    max_ptr,
    sum_ptr,
    acc_ptr,
    pos_ptr,
    out_ptr,
    SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Program: one query head; its chunks up to pos's, combined as the single pass combines its steps.
    head = tl.program_id(0)
    d = tl.arange(0, HEAD_DIM)
    pos = tl.load(pos_ptr)
    best = -float("inf")
    total = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start in range(0, pos // CHUNK + 1, BLOCK_S):  # chunk 0 holds slot 0: best is finite after this step
        s = start + tl.arange(0, BLOCK_S)
        valid = (s * CHUNK <= pos) & (s < SPLITS)
        at = head * SPLITS + s
        chunk_best = tl.load(max_ptr + at, mask=valid, other=-float("inf"))
        new_best = tl.maximum(best, tl.max(chunk_best, 0))
        shrink = tl.exp(best - new_best)
        weight = tl.exp(chunk_best - new_best)  # 0 for the masked chunks
        chunk_acc = tl.load(acc_ptr + at[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * shrink + tl.sum(weight[:, None] * chunk_acc, 0)
        total = total * shrink + tl.sum(weight * tl.load(sum_ptr + at, mask=valid, other=0.0), 0)
        best = new_best
    tl.store(out_ptr + head * HEAD_DIM + d, acc / total)


@triton.jit
def _add_matvec_kernel(
    x_ptr, w_ptr, h_ptr, out_ptr, OUT: tl.constexpr, INNER: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < OUT
    acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    for start in range(0, INNER, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_mask = k < INNER
        h = tl.load(h_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        mask = row_mask[:, None] & k_mask[None, :]
        acc += tl.load(w_ptr + rows[:, None] * INNER + k[None, :], mask=mask, other=0.0).to(tl.float32) * h[None, :]
    x = tl.load(x_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, (x + tl.sum(acc, 1)).to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _gated_mlp_kernel(
    x_ptr,
    norm_ptr,
    w_ptr,
    out_ptr,
    eps,
    HIDDEN: tl.constexpr,
    INTERMEDIATE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # gate rows; up rows follow all gate rows
    row_mask = rows < INTERMEDIATE
    gate, up = _normed_matvec_pair(
        x_ptr, norm_ptr, w_ptr, rows, rows + INTERMEDIATE, row_mask, eps, HIDDEN, ROWS, BLOCK_K
    )
    tl.store(out_ptr + rows, gate * tl.sigmoid(gate) * up, mask=row_mask)


def _block_k(inner: int) -> int:
    return min(MAX_BLOCK_K, triton.next_power_of_2(inner))


@torch.library.custom_op("chat_triton::qkv_rope", mutates_args=("k_cache", "v_cache"))
def qkv_rope(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    wqkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """q of the token at pos (float32, rotated); its k (rotated) and v go into the caches at pos."""
    _, kv_heads, cache_len, head_dim = k_cache.shape
    q = torch.empty(wqkv.shape[0] - 2 * kv_heads * head_dim, dtype=torch.float32, device=x.device)
    heads = q.shape[0] // head_dim
    grid = ((heads + 2 * kv_heads) * head_dim // 2 // PAIRS,)
    _qkv_rope_kernel[grid](
        x,
        norm_weight,
        wqkv,
        cos,
        sin,
        pos,
        q,
        k_cache,
        v_cache,
        cache_len,
        eps,
        HIDDEN=x.shape[0],
        HEADS=heads,
        KV_HEADS=kv_heads,
        HEAD_DIM=head_dim,
        PAIRS=PAIRS,
        BLOCK_K=_block_k(x.shape[0]),
    )
    return q


@qkv_rope.register_fake
def _(x, norm_weight, wqkv, cos, sin, pos, k_cache, v_cache, eps):
    return x.new_empty(wqkv.shape[0] - 2 * k_cache.shape[1] * k_cache.shape[3], dtype=torch.float32)


@torch.library.custom_op("chat_triton::attend", mutates_args=())
def attend(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, window: torch.Tensor
) -> torch.Tensor:
    """Attention of q's heads (float32, flat) over cache slots 0..pos < len(window); float32, flat. Only the
    window's length is read: it picks the single pass or the split one (see SINGLE_PASS_MAX)."""
    _, kv_heads, cache_len, head_dim = k_cache.shape
    out = torch.empty_like(q)
    heads = q.shape[0] // head_dim
    scale = 1 / math.sqrt(head_dim)
    if window.shape[0] <= SINGLE_PASS_MAX:
        _attend_kernel[(heads,)](
            q,
            k_cache,
            v_cache,
            pos,
            out,
            cache_len,
            scale,
            GROUPS=heads // kv_heads,
            HEAD_DIM=head_dim,
            BLOCK_T=BLOCK_T,
        )
        return out
    splits = triton.cdiv(window.shape[0], SPLIT_CHUNK)
    best = torch.empty(heads, splits, dtype=torch.float32, device=q.device)
    total = torch.empty_like(best)
    acc = torch.empty(heads, splits, head_dim, dtype=torch.float32, device=q.device)
    _attend_split_kernel[(heads, splits)](
        q,
        k_cache,
        v_cache,
        pos,
        best,
        total,
        acc,
        cache_len,
        scale,
        SPLITS=splits,
        GROUPS=heads // kv_heads,
        HEAD_DIM=head_dim,
        CHUNK=SPLIT_CHUNK,
    )
    _attend_reduce_kernel[(heads,)](
        best,
        total,
        acc,
        pos,
        out,
        SPLITS=splits,
        HEAD_DIM=head_dim,
        CHUNK=SPLIT_CHUNK,
        BLOCK_S=min(REDUCE_BLOCK, triton.next_power_of_2(splits)),
    )
    return out


@attend.register_fake
def _(q, k_cache, v_cache, pos, window):
    return torch.empty_like(q)


@torch.library.custom_op("chat_triton::add_matvec", mutates_args=())
def add_matvec(x: torch.Tensor, weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + weight @ h, in x's dtype (the residual stream); weight is (out, in)."""
    out = torch.empty_like(x)
    rows, inner = weight.shape
    _add_matvec_kernel[(triton.cdiv(rows, ROWS),)](
        x, weight, h, out, OUT=rows, INNER=inner, ROWS=ROWS, BLOCK_K=_block_k(inner)
    )
    return out


@add_matvec.register_fake
def _(x, weight, h):
    return torch.empty_like(x)


@torch.library.custom_op("chat_triton::gated_mlp", mutates_args=())
def gated_mlp(x: torch.Tensor, norm_weight: torch.Tensor, wup: torch.Tensor, eps: float) -> torch.Tensor:
    """silu(gate) * up of RMSNorm(x), float32; wup holds the gate rows, then the up rows."""
    intermediate = wup.shape[0] // 2
    out = torch.empty(intermediate, dtype=torch.float32, device=x.device)
    _gated_mlp_kernel[(triton.cdiv(intermediate, ROWS),)](
        x,
        norm_weight,
        wup,
        out,
        eps,
        HIDDEN=x.shape[0],
        INTERMEDIATE=intermediate,
        ROWS=ROWS,
        BLOCK_K=_block_k(x.shape[0]),
    )
    return out


@gated_mlp.register_fake
def _(x, norm_weight, wup, eps):
    return x.new_empty(wup.shape[0] // 2, dtype=torch.float32)


def fusable(lean: LeanLM) -> bool:
    """Whether lean's decode can take the fused kernels: the llama family exported for CUDA, without biases,
    with RoPE over whole heads of a power-of-two size (the kernels' block shapes)."""
    s = lean.shape
    return (
        lean.for_cuda
        and s.family == "llama"
        and s.rotary_dim == s.head_dim
        and s.head_dim >= 2 * PAIRS
        and s.head_dim & (s.head_dim - 1) == 0
        and all(b.bqkv is None and b.bo is None and b.bup is None and b.bdown is None for b in lean.blocks)
    )


def decode_fused(lean: LeanLM, ids: torch.Tensor, positions: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """LeanLM.decode with four fused ops a layer; positions holds the token's position (one element), window
    the cache bucket, whose length the traced graph passes on as it is (attend's launch depends on it)."""
    s = lean.shape
    x = F.embedding(ids, lean.embed)[0]
    for block in lean.blocks:
        q = qkv_rope(x, block.ln1, block.wqkv, lean.cos, lean.sin, positions, block.k_cache, block.v_cache, s.norm_eps)
        x = add_matvec(x, block.wo, attend(q, block.k_cache, block.v_cache, positions, window))
        x = add_matvec(x, block.wdown, gated_mlp(x, block.ln2, block.wup, s.norm_eps))
    x = F.rms_norm(x, (s.hidden_size,), lean.norm_w, s.norm_eps)
    return torch.mv(lean.embed if lean.lm_head is None else lean.lm_head, x)


@contextlib.contextmanager
def fused_decode() -> Iterator[None]:
    """The exporter with decode_fused as the traced decode of the modules it fits (see fusable)."""
    plain = LeanLM.decode

    def decode(self: LeanLM, ids: torch.Tensor, positions: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        return decode_fused(self, ids, positions, window) if fusable(self) else plain(self, ids, positions, window)

    LeanLM.decode = decode
    try:
        yield
    finally:
        LeanLM.decode = plain
