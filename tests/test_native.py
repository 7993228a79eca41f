"""chat's native CPU kernels (chat/native): the ops against torch's own, artifacts that call them, and the
fallback onto torch's kernels where the library is missing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
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


@pytest.fixture(params=["widest", "avx2", "torch"])
def kernels(request, ops, monkeypatch):
    """torch.ops.chat on each form of the kernels: the widest this CPU runs (AVX-512 here), AVX2, and torch's
    own kernels behind the same ops (CPUs with neither). $CHAT_NATIVE_ISA caps the form, read at each call."""
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


# Shapes with and without tails: rows not a multiple of the 4-row blocks, columns not a multiple of a vector.
SHAPES = [(3072, 576), (576, 1536), (7, 50), (13, 33), (1, 16), (5, 1)]


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
    rounded to the dtype, as chat/export/model.py's _norm computes it in torch's ops."""
    torch.manual_seed(3)
    w, x, weight, eps_root = torch.randn(96, 64), torch.randn(64) * 3, torch.rand(64) + 0.5, 0.2
    w, x, weight = w.to(dtype), x.to(dtype), weight.to(dtype)
    unit = x.float() / torch.hypot(torch.linalg.vector_norm(x.float()), torch.tensor(eps_root))
    normed = weight * (unit * 8.0).to(dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(kernels.matvec(w, x, eps_root, weight), torch.mv(w, normed), **tolerance)
    gate, up = torch.mv(w, normed).chunk(2)
    torch.testing.assert_close(kernels.silu_mul_matvec(w, x, eps_root, weight), F.silu(gate) * up, **tolerance)


@pytest.mark.parametrize(("rows", "cols"), [(3072, 576), (14, 33)])
def test_silu_mul_matvec_is_a_gated_mlps_first_half(kernels, rows, cols):
    torch.manual_seed(rows)
    w, x = torch.randn(rows, cols) / 8, torch.randn(cols)
    gate, up = torch.mv(w, x).chunk(2)
    torch.testing.assert_close(kernels.silu_mul_matvec(w, x), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
    normed = x / torch.hypot(torch.linalg.vector_norm(x), torch.tensor(0.5))
    gate, up = torch.mv(w, normed).chunk(2)
    torch.testing.assert_close(kernels.silu_mul_matvec(w, x, 0.5), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
    wb, xb = w.bfloat16(), x.bfloat16()
    gate, up = torch.mv(wb, xb).chunk(2)
    got = kernels.silu_mul_matvec(wb, xb)
    assert got.dtype == torch.bfloat16 and (got != F.silu(gate) * up).float().mean() < 0.01
    with pytest.raises(RuntimeError, match="even number of rows"):
        kernels.silu_mul_matvec(torch.randn(3, 16), torch.randn(16))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_silu_mul_matvec_and_weighted_norm(kernels, dtype):
    torch.manual_seed(7)
    (q, scales), x, norm_weight = int8_rows(3072, 576), (torch.randn(576) / 16).to(dtype), torch.rand(576).to(dtype)
    gate, up = ((q.double() * scales.double()[:, None]) @ x.double()).chunk(2)
    exact = F.silu(gate) * up
    got = kernels.silu_mul_matvec(q, x, None, None, scales)
    # float32: within summing order; bfloat16: within its rounding of gate, silu(gate) and the product
    bound = exact.abs().max() * (1e-5 if dtype == torch.float32 else 2**-6)
    assert got.dtype == dtype and (got.double() - exact).abs().max() <= bound
    # With a norm: the same as the norm taken first, then the int8 product.
    normed = kernels.matvec(torch.eye(576, dtype=dtype), x, 0.5, norm_weight)
    torch.testing.assert_close(
        kernels.matvec(q, x, 0.5, norm_weight, scales), kernels.matvec(q, normed, None, None, scales)
    )


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
    with pytest.raises(RuntimeError, match="scales are for int8 weights only"):
        ops.matvec(torch.randn(8, 16), torch.randn(16), None, None, scales)


def test_matvec_on_strided_input_and_other_dtypes_uses_torchs_kernels(ops):
    w, x = torch.randn(64, 48), torch.randn(64)
    torch.testing.assert_close(ops.matvec(w.t(), x), torch.mv(w.t(), x), rtol=1e-5, atol=1e-5)
    wd, xd = w.double(), torch.randn(48).double()
    torch.testing.assert_close(ops.matvec(wd, xd), torch.mv(wd, xd))


def reference_cache_attend(qkv, cos, sin, k_cache, v_cache, pos, n):
    """What chat::cache_attend does, in torch's ops on float64 (caches updated in place)."""
    kv_heads, d = k_cache.size(1), k_cache.size(3)
    heads = qkv.numel() // d - 2 * kv_heads
    q, k, v = qkv.double().split([heads * d, kv_heads * d, kv_heads * d])

    def rope(x, count):
        x = x.reshape(count, d)
        if cos is None:
            return x
        rotary, half = cos.numel(), cos.numel() // 2
        r = x[:, :rotary]
        out = r * cos.double() + torch.cat([r[:, half:], r[:, :half]], 1) * sin.double()
        return torch.cat([out, x[:, rotary:]], 1)

    k_cache[0, :, pos] = rope(k, kv_heads).to(k_cache.dtype)
    v_cache[0, :, pos] = v.reshape(kv_heads, d).to(v_cache.dtype)
    q = rope(q, heads).reshape(1, kv_heads, heads // kv_heads, d)
    keys, values = k_cache[:, :, :n].double(), v_cache[:, :, :n].double()
    return F.scaled_dot_product_attention(q, keys, values).reshape(-1)


@pytest.mark.parametrize("pos", [0, 5, 62, 63, 64, 199, 1000])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "rotary"), [(9, 3, 64, 64), (2, 2, 16, 16), (4, 1, 128, 64), (14, 2, 32, 0)]
)
def test_cache_attend_float32(kernels, pos, heads, kv_heads, head_dim, rotary):
    """RoPE (whole or partial, or none), the cache write and attention over positions 0..pos, across the
    64-position work items' edges."""
    torch.manual_seed(pos + heads)
    qkv = torch.randn((heads + 2 * kv_heads) * head_dim)
    angles = torch.rand(rotary // 2) * 6
    cos = torch.cat([angles.cos(), angles.cos()]) if rotary else None
    sin = torch.cat([-angles.sin(), angles.sin()]) if rotary else None  # the sign folded in, as the tables hold it
    k_cache, v_cache = torch.randn(2, 1, kv_heads, 1024, head_dim).unbind(0)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    positions, window = torch.tensor([pos]), torch.arange(pos + 1)
    got = kernels.cache_attend(qkv, cos, sin, k_cache, v_cache, positions, window)
    expected = reference_cache_attend(qkv, cos, sin, k_ref, v_ref, pos, pos + 1)
    torch.testing.assert_close(k_cache, k_ref)
    torch.testing.assert_close(v_cache, v_ref)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("pos", [4, 64, 300])
def test_cache_attend_bfloat16_within_rounding(kernels, pos):
    torch.manual_seed(pos)
    qkv = torch.randn(15 * 64).bfloat16()
    angles = torch.rand(32) * 6
    cos = torch.cat([angles.cos(), angles.cos()]).bfloat16()
    sin = torch.cat([-angles.sin(), angles.sin()]).bfloat16()
    k_cache, v_cache = torch.randn(2, 1, 3, 512, 64).bfloat16().unbind(0)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    got = kernels.cache_attend(qkv, cos, sin, k_cache, v_cache, torch.tensor([pos]), torch.arange(pos + 1))
    expected = reference_cache_attend(qkv, cos, sin, k_ref, v_ref, pos, pos + 1)
    assert got.dtype == torch.bfloat16
    assert (got.double() - expected).abs().max() < 2**-6
    # The new key rounds as torch's bfloat16 ops would: each product, then the sum.
    k = qkv[9 * 64 :].reshape(-1, 64)[:3]
    rotated = k * cos + torch.cat([k[:, 32:], k[:, :32]], 1) * sin
    assert torch.equal(k_cache[0, :, pos], rotated)


def test_cache_attend_on_float16_uses_torchs_ops(ops):
    qkv, k_cache, v_cache = torch.randn(4 * 16).half(), torch.zeros(1, 1, 8, 16).half(), torch.zeros(1, 1, 8, 16).half()
    got = ops.cache_attend(qkv, None, None, k_cache, v_cache, torch.tensor([0]), torch.arange(1))
    torch.testing.assert_close(got, qkv[48:].repeat(2))  # one position: each query head gets its value
    assert torch.equal(k_cache[0, 0, 0], qkv[32:48]) and torch.equal(v_cache[0, 0, 0], qkv[48:])


def test_export_calls_the_ops_and_lists_them(llama_artifact, ops):
    manifest = json.loads((llama_artifact / "chat-artifact.json").read_text())
    assert manifest["ops"] == ["chat"]
    from chat.export.model import quiet_torchscript

    with quiet_torchscript():
        code = torch.jit.load(str(llama_artifact / "model.ts")).decode.code
    for op in ("matvec", "silu_mul_matvec", "add_matvec", "cache_attend"):
        assert f"ops.chat.{op}(" in code


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
    from chat.commands import describe_device

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
