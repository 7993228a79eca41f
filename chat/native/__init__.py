"""chat's native CPU kernels (kernels.cpp): the ops of one decoded token's layer, as torch ops.

torch.ops.chat.matvec (w @ x, optionally of x's RMSNorm), silu_mul_matvec (a gated MLP's first half),
add_matvec (r + w @ x), cache_attend (RoPE, the cache write and attention for one token) and dequantize
(int8 weights made whole, for prefill): kernels.cpp says what each does; the matvecs take int8 weights with
their rows' scales too. CPU artifacts exported where the kernels are built call them at decode; their
manifest lists "chat" in "ops".

The kernels are compiled once per machine, torch version and source (about 10 s of g++ against torch's
headers): by `make`, by `python -m chat.native`, or by export when missing. The library is looked for in
`lib/` beside this file (where the Docker image and the bundle put it), then in the user cache
($CHAT_NATIVE_DIR, else $XDG_CACHE_HOME/chat/native or ~/.cache/chat/native). Where it is missing (no
compiler, say), the same ops run on torch's own kernels, registered here: slower, same results. The library
picks its AVX-512 or AVX2 code by the CPU when it runs ($CHAT_NATIVE_ISA=avx2 or =torch caps it).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from chat.errors import ChatError

SOURCE = Path(__file__).with_name("kernels.cpp")
PACKAGED = Path(__file__).with_name("lib")
OPS = "chat"  # the torch.ops namespace, as listed in an artifact manifest's "ops"

_native: bool | None = None  # None until load(): whether the compiled kernels run the ops
_why_not = ""
_fallback = None  # the torch.library.Library of the fallback ops; kept alive while the process runs


class NativeBuildError(ChatError):
    pass


def library_name() -> str:
    """One file per source, torch version and Python: a library built for another torch is never loaded."""
    import torch

    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    tag = f"{torch.__version__}-{sys.implementation.cache_tag}-{platform.machine()}"
    return f"chat_native-{digest}-{tag.replace('+', '_')}.so"


def cache_dir() -> Path:
    if os.environ.get("CHAT_NATIVE_DIR"):
        return Path(os.environ["CHAT_NATIVE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chat" / "native"


def buildable() -> str | None:
    """None where the kernels build and load (Linux on x86-64; they pick their code by CPU at run time)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"no native kernels for {sys.platform} on {platform.machine()} yet"
    return None


def supported() -> str | None:
    """None where the kernels are faster than torch's: buildable, on a CPU with AVX2 or AVX-512; else why not."""
    if buildable():
        return buildable()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    return None if "avx512f" in flags or {"avx2", "fma"} <= set(flags) else "this CPU has neither AVX2 nor AVX-512"


def find_library() -> Path | None:
    name = library_name()
    for directory in (PACKAGED, cache_dir()):
        if (directory / name).is_file():
            return directory / name
    return None


def build(directory: Path | None = None) -> Path:
    """Compile kernels.cpp into `directory` (default: the user cache), atomically; return the library."""
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise NativeBuildError("no C++ compiler (g++) found to build chat's native kernels; install g++")
    directory = Path(directory or cache_dir())
    target = directory / library_name()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=".chat_native-", suffix=".so", dir=directory)
        os.close(fd)
    except OSError as why:
        raise NativeBuildError(
            f"cannot write in {directory} ({why.strerror or why}); name a writable directory "
            "(CHAT_NATIVE_DIR, or --into for python -m chat.native)"
        ) from None
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [
        compiler,
        # No contraction into fused multiply-adds: RoPE rounds each product as torch's ops do.
        *("-O3", "-ffp-contract=off", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w"),
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{path}" for path in include_paths()),
        str(SOURCE),
        *(f"-L{path}" for path in library_paths()),
        *("-lc10", "-ltorch_cpu", "-o", partial),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise NativeBuildError(f"building chat's native kernels failed ({last})")
        os.chmod(partial, 0o755)  # mkstemp's 0600 would hide it from other users (the image's, say)
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def load(build_missing: bool = False) -> bool:
    """Register the torch.ops.chat ops, once per process; True when the compiled kernels run them.

    build_missing: compile the library first if it is missing (export does; a chat does not wait for g++)."""
    global _native, _why_not
    if _native is not None:
        return _native
    import torch

    _why_not = buildable() or ""
    path = None if _why_not else find_library()
    if path is None and not _why_not:
        if build_missing:
            try:
                path = build()
            except ChatError as why:
                _why_not = str(why)
        else:
            _why_not = "chat's native kernels are not built (python -m chat.native builds them)"
    if path is not None:
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as why:
            _why_not = f"chat's native kernels did not load ({str(why).splitlines()[0][:160]})"
            path = None
    _native = path is not None
    if not _native:
        _register_fallback()
    return _native


def kernels_in_use() -> str:
    """After load(): which kernels run the ops, for !status: "native AVX-512", "native AVX2", or "" (torch's)."""
    if not _native:
        return ""
    import torch

    return {"avx512": "native AVX-512", "avx2": "native AVX2"}.get(torch.ops.chat.instruction_set(), "")


def why_not() -> str:
    """After load() returned False: why torch's own kernels run the ops."""
    return _why_not


def _register_fallback() -> None:
    """The ops on torch's kernels, for artifacts that call them where the library is missing."""
    global _fallback
    import torch
    import torch.nn.functional as F

    from chat.export.model import rotate_half, unit_norm  # the exported module's own steps

    def rms_norm(x: torch.Tensor, eps_root: float | None, weight: torch.Tensor | None) -> torch.Tensor:
        if eps_root is None:
            return x
        unit = unit_norm(x.float(), torch.tensor(eps_root))
        return unit.to(x.dtype) if weight is None else weight * (unit * x.numel() ** 0.5).to(x.dtype)

    def mv(w: torch.Tensor, x: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        if scales is None:
            return torch.mv(w, x)
        return (torch.mv(w.float(), x.float()) * scales).to(x.dtype)  # int8 rows: summed in float32, then scaled

    def matvec(w, x, eps_root=None, norm_weight=None, scales=None):
        return mv(w, rms_norm(x, eps_root, norm_weight), scales)

    def silu_mul_matvec(w, x, eps_root=None, norm_weight=None, scales=None):
        gate, up = matvec(w, x, eps_root, norm_weight, scales).chunk(2)
        return F.silu(gate) * up

    def cache_attend(qkv, cos, sin, k_cache, v_cache, positions, window):  # see kernels.cpp
        kv_heads, d = k_cache.size(1), k_cache.size(3)
        heads = qkv.numel() // d - 2 * kv_heads
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d])

        def rope(x: torch.Tensor, count: int) -> torch.Tensor:
            x = x.reshape(count, d)
            return x if cos is None else rotate_half(x, cos, sin, cos.numel())

        k_cache.index_copy_(2, positions, rope(k, kv_heads).reshape(1, kv_heads, 1, d))
        v_cache.index_copy_(2, positions, v.reshape(1, kv_heads, 1, d))
        n = window.size(0)
        q = rope(q, heads).reshape(1, kv_heads, heads // kv_heads, d)
        return F.scaled_dot_product_attention(q, k_cache[:, :, :n], v_cache[:, :, :n]).reshape(-1)

    _fallback = torch.library.Library(OPS, "DEF")
    matvec_schema = (
        "(Tensor w, Tensor x, float? unit_norm=None, Tensor? norm_weight=None, Tensor? scales=None) -> Tensor"
    )
    for name, schema, kernel in (
        ("matvec", matvec_schema, matvec),
        ("silu_mul_matvec", matvec_schema, silu_mul_matvec),
        (
            "add_matvec",
            "(Tensor r, Tensor w, Tensor x, Tensor? scales=None) -> Tensor",
            lambda r, w, x, scales=None: r + mv(w, x, scales),
        ),
        (
            "dequantize",
            "(Tensor w, Tensor scales, Tensor like) -> Tensor",
            lambda w, scales, like: (w.float() * scales.unsqueeze(1)).to(like.dtype),
        ),
        (
            "cache_attend",
            "(Tensor qkv, Tensor? cos, Tensor? sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions, "
            "Tensor window) -> Tensor",
            cache_attend,
        ),
    ):
        _fallback.define(name + schema)
        _fallback.impl(name, kernel, "CompositeExplicitAutograd")
