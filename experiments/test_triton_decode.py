"""The fused Triton decode candidate (experiments/triton_decode.py) against the exported CUDA decode it would replace,
on the tiny llama: logits at several positions of a small cache bucket (single-pass attention) and of a large one
(split attention) in float32 and bfloat16, and the traced, saved and loaded module with both buckets.

Without CUDA the kernels run on CPU tensors in Triton's interpreter; without triton (CI) the file is skipped."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (CI has none): the fused decode candidate needs it", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported

import triton_decode
from helpers import TINY_DECODER
from triton_decode import REDUCE_BLOCK, SINGLE_PASS_MAX, SPLIT_CHUNK, decode_fused, fusable, fused_decode

from chat.export import trace
from chat.export.families import convert
from chat.export.model import LeanLM, allocate_cache, quiet_torchscript

HERE = Path(__file__).resolve().parent
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MAX_LEN = TINY_DECODER["max_position_embeddings"]
VOCAB = 300
SMALL, LARGE = SINGLE_PASS_MAX, 2 * SINGLE_PASS_MAX  # cache buckets (windows) of each attention path
# (window, positions, chunks a reduction step). Small: position 0 (nothing cached), either side of a single-pass
# step (64 slots), past the first 128. Large, 4 chunks of 128: position 0 (3 chunks empty), either side of a
# chunk's end, a position in the bucket below (chunks past it empty), the bucket's last slot; then positions
# whose reduction takes two steps (the real buckets need 2048 slots and more for that).
BUCKETS = {
    "small-bucket": (SMALL, (0, 1, 64, 130), REDUCE_BLOCK),
    "large-bucket": (LARGE, (0, SPLIT_CHUNK - 1, SPLIT_CHUNK, 200, 300, LARGE - 1), REDUCE_BLOCK),
    "large-bucket-reduced-in-steps": (LARGE, (300, LARGE - 1), 2),
}
# Sizes the kernels' blocks do not divide (SmolLM2's hidden 576 is not a power of two) and 3 query heads a
# kv head, as SmolLM2 has.
ODD_DECODER = {**TINY_DECODER, "hidden_size": 108, "intermediate_size": 60, "num_attention_heads": 3}
ODD_DECODER |= {"num_key_value_heads": 1, "head_dim": 32}


@pytest.fixture(autouse=True)
def interpreter_loop_bounds(monkeypatch):
    """Triton 3.6's interpreter turns a loop bound read from memory into an int with int(1-element array),
    which numpy >= 2.4 refuses (triton-lang/triton#9171, fixed upstream); compiled kernels are not concerned."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)


def exported_for_cuda(dtype: torch.dtype, decoder: dict = TINY_DECODER, max_len: int = MAX_LEN) -> LeanLM:
    """The tiny llama as export builds it for CUDA (masked bucket, fused norms), with random norm weights so
    that the kernels' norm weights count, and a cache (and RoPE table) of max_len slots."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, **decoder, tie_word_embeddings=True, rope_theta=10000.0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.3)
    shape, top, layers, rope = convert(hf, max_len)

    def cast(weights: dict) -> dict:
        return {k: None if v is None else v.to(DEVICE, dtype) for k, v in weights.items()}

    table = (rope[0].to(DEVICE, dtype), rope[1].to(DEVICE, dtype))
    lean = LeanLM(shape, cast(top), [cast(w) for w in layers], table, for_cuda=True, transposed=set()).eval()
    lean.allocate(max_len)
    assert fusable(lean)
    return lean


@pytest.mark.parametrize("bucket", BUCKETS)
@pytest.mark.parametrize(
    ("dtype", "decoder", "atol"),
    [(torch.float32, TINY_DECODER, 1e-5), (torch.bfloat16, TINY_DECODER, 3e-2), (torch.float32, ODD_DECODER, 1e-5)],
    ids=["float32", "bfloat16", "float32-odd-sizes"],
)
def test_fused_decode_gives_the_exported_decode_logits(dtype, decoder, atol, bucket, monkeypatch):
    """At each position: the exported decode, then the fused one on the same cache and bucket; logits and the
    k/v slot the step wrote agree (bfloat16: within its rounding, the fused kernels keeping float32 in between)."""
    window, at_positions, reduce_block = BUCKETS[bucket]
    monkeypatch.setattr(triton_decode, "REDUCE_BLOCK", reduce_block)
    lean = exported_for_cuda(dtype, decoder, window)
    ids = torch.randint(0, VOCAB, (window,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    positions = torch.arange(window, device=DEVICE)
    with torch.inference_mode():
        for pos in at_positions:
            if pos:
                lean.prefill(ids[:pos], positions[:pos], positions[:pos])
            token, at = ids[pos : pos + 1], positions[pos : pos + 1]
            expected = lean.decode(token, at, positions).float()
            written = [(b.k_cache[:, :, pos].clone(), b.v_cache[:, :, pos].clone()) for b in lean.blocks]
            got = decode_fused(lean, token, at, positions).float()
            print(f"{dtype} {bucket} position {pos}: max |logit difference| {(got - expected).abs().max():.3g}")
            torch.testing.assert_close(got, expected, atol=atol, rtol=0)
            if dtype == torch.float32:
                assert int(got.argmax()) == int(expected.argmax())
            for block, (k, v) in zip(lean.blocks, written, strict=True):
                torch.testing.assert_close(block.k_cache[:, :, pos], k, atol=atol, rtol=0)
                torch.testing.assert_close(block.v_cache[:, :, pos], v, atol=atol, rtol=0)


def test_traced_artifact_with_fused_ops_runs(tmp_path, monkeypatch):
    """Traced under fused_decode, decode calls the chat_triton ops (prefill none) and passes its window input on
    to attend; saved, loaded and frozen as the backend does, it decodes greedily past position 128 as the
    exported module does, token for token, in a small bucket and then a large one, each on its attention path."""
    lean = exported_for_cuda(torch.float32, max_len=LARGE)
    with fused_decode():
        traced = trace(lean, LARGE, DEVICE)
    graph = traced.decode.graph
    assert {"chat_triton::qkv_rope", "chat_triton::attend", "chat_triton::add_matvec", "chat_triton::gated_mlp"} <= {
        node.kind() for node in graph.nodes()
    }
    window = list(graph.inputs())[3]  # self, ids, positions, window: the bucket's length is not a constant
    assert window.debugName() == "window"
    assert all(node.inputsAt(4) == window for node in graph.nodes() if node.kind() == "chat_triton::attend")
    assert not [node for node in traced.prefill.graph.nodes() if node.kind().startswith("chat_triton::")]
    allocate_cache(traced, lean.shape, 0, torch.float32, DEVICE)  # as export saves it
    with quiet_torchscript():
        torch.jit.save(traced, str(tmp_path / "model.ts"))
        loaded = torch.jit.load(str(tmp_path / "model.ts"), map_location=DEVICE)
        allocate_cache(loaded, lean.shape, LARGE, torch.float32, DEVICE)
        loaded = torch.jit.freeze(loaded.eval(), preserved_attrs=["prefill", "decode"])

    split_launches = []  # the split pass's grids, through a spy on its kernel

    class Spy:
        def __getitem__(self, grid):
            split_launches.append(grid)
            return split_kernel[grid]

    split_kernel = triton_decode._attend_split_kernel
    monkeypatch.setattr(triton_decode, "_attend_split_kernel", Spy())
    reference = exported_for_cuda(torch.float32, max_len=LARGE)
    prompt = torch.randint(0, VOCAB, (128,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    positions = torch.arange(LARGE, device=DEVICE)
    with torch.inference_mode():
        got = loaded.prefill(prompt, positions[:128], positions[:128])
        expected = reference.prefill(prompt, positions[:128], positions[:128])
        for pos, bucket in ((128, SMALL), (129, SMALL), (130, LARGE), (131, LARGE)):
            token = expected.argmax().reshape(1)
            launches = len(split_launches)
            got = loaded.decode(token, positions[pos : pos + 1], positions[:bucket])
            expected = reference.decode(token, positions[pos : pos + 1], positions[:bucket])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            assert int(got.argmax()) == int(expected.argmax())
            heads, splits = lean.shape.heads, LARGE // SPLIT_CHUNK
            assert split_launches[launches:] == ([] if bucket == SMALL else [(heads, splits)] * lean.shape.layers)


def test_kernels_compile_for_hopper():
    """experiments/triton_compile_check.py, in a process of its own: the interpreter this file runs does not compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(HERE / "triton_compile_check.py")], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kernels for sm_90" in done.stdout
