#!/usr/bin/env python3
"""Compile every kernel of experiments/triton_decode.py for sm_90 (H100/H200) here, without a GPU.

Triton's CPU interpreter (experiments/test_triton_decode.py) checks what the kernels compute, not that they compile:
this runs the real compiler down to ptxas, at the demo model's shape, in bfloat16 and float32, with and without
the 16-byte alignment torch's allocations have. Run it after any change to the kernels, before a GPU session.
Needs triton (not TRITON_INTERPRET=1); exits 1 on the first kernel that does not compile.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton
import triton_decode as td
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SMOLLM2 = {"hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "head_dim": 64}
FLOAT32_POINTERS = {"q_ptr", "out_ptr", "max_ptr", "sum_ptr", "acc_ptr", "h_ptr"}  # the rest: the model's dtype
HOPPER = GPUTarget("cuda", 90, 32)


def kernels(m: dict) -> list[tuple[object, dict]]:
    """Each kernel with the constants its op wrapper in triton_decode gives it at shape m."""
    block_k = td._block_k(m["hidden"])
    groups = m["heads"] // m["kv_heads"]
    found = [
        (
            td._qkv_rope_kernel,
            {"HIDDEN": m["hidden"], "HEADS": m["heads"], "KV_HEADS": m["kv_heads"], "HEAD_DIM": m["head_dim"]}
            | {"PAIRS": td.PAIRS, "BLOCK_K": block_k},
        ),
        (td._attend_kernel, {"GROUPS": groups, "HEAD_DIM": m["head_dim"], "BLOCK_T": td.BLOCK_T}),
        (
            td._gated_mlp_kernel,
            {"HIDDEN": m["hidden"], "INTERMEDIATE": m["intermediate"], "ROWS": td.ROWS, "BLOCK_K": block_k},
        ),
    ]
    for inner in (m["heads"] * m["head_dim"], m["intermediate"]):  # wo, then wdown
        found.append(
            (
                td._add_matvec_kernel,
                {"OUT": m["hidden"], "INNER": inner, "ROWS": td.ROWS, "BLOCK_K": td._block_k(inner)},
            )
        )
    for splits in (4, 8, 32):  # the 512-, 1024- and 4096-slot buckets
        chunked = {"SPLITS": splits, "HEAD_DIM": m["head_dim"], "CHUNK": td.SPLIT_CHUNK}
        found.append((td._attend_split_kernel, chunked | {"GROUPS": groups}))
        found.append(
            (td._attend_reduce_kernel, chunked | {"BLOCK_S": min(td.REDUCE_BLOCK, triton.next_power_of_2(splits))})
        )
    return found


def compile_for_hopper(kernel, constants: dict, dtype: str, aligned: bool) -> None:
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
        elif name == "pos_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FLOAT32_POINTERS else f"*{dtype}"
        else:
            signature[name] = "i32" if name == "cache_len" else "fp32"
    # Torch's allocations are 16-byte aligned; the hint lets the compiler take its vectorised path.
    hints = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr") and n != "pos_ptr"}
    triton.compile(ASTSource(kernel, signature, constants, hints if aligned else None), target=HOPPER)


def main() -> int:
    count = 0
    for dtype in ("bf16", "fp32"):
        for aligned in (True, False):
            for kernel, constants in kernels(SMOLLM2):
                try:
                    compile_for_hopper(kernel, constants, dtype, aligned)
                except Exception as why:
                    print(f"{kernel.__name__} {constants} {dtype} aligned={aligned}: {why}")
                    return 1
                count += 1
    print(f"compiled {count} kernels for sm_90 (SmolLM2-135M shape; bf16, fp32; aligned and not)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
