"""chat's native CPU kernels (the C++ beside this file): the ops of one decoded token's layer, as torch ops.

torch.ops.chat.matvec (w @ x, optionally of x's RMSNorm), silu_mul_matvec and gelu_tanh_mul_matvec (a gated
MLP's first half, SwiGLU or GeGLU), add_matvec (r + w @ x), cache_attend (RoPE, the cache write and attention
for one token; optionally with its own score scale, Gemma 2's soft cap on the scores, and a sliding window of
the last W positions) and dequantize (quantized weights made whole, for prefill): ops.cpp says what each does;
the matvecs take int8 weights with their rows' scales, and int4 weights with their groups' (int4.h). CPU
artifacts exported where the kernels are built call them at decode; their manifest lists "chat" in "ops".

The kernels are compiled once per machine, torch version and source (about 10 s of g++ against torch's
headers): by the first chat or export that finds them missing, by `make`, or by `python -m chat.native`. The
library is looked for in `lib/` beside this file (where the Docker image and the bundle put it), then in the
user cache ($XDG_CACHE_HOME/chat/native or ~/.cache/chat/native); $CHAT_NATIVE_DIR names one directory
instead of both. A build goes into `lib/` when it is writable (a venv the user owns: every HOME of that
install shares it), else the user cache. Where it cannot be built (no compiler, say), the same ops run on
torch's own kernels, registered here: slower, same results. The library picks its AVX-512 or AVX2 code by the
CPU when it runs ($CHAT_NATIVE_ISA=avx2 or =torch caps it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from chat.errors import ChatError

if TYPE_CHECKING:
    import torch

# In the order library_name() hashes them; the .cpp files are compiled, the headers included.
SOURCES = tuple(
    Path(__file__).with_name(name) for name in ("isa.h", "int4.h", "ops.h", "matvec.cpp", "attention.cpp", "ops.cpp")
)
PACKAGED = Path(__file__).with_name("lib")
OPS = "chat"  # the torch.ops namespace, as listed in an artifact manifest's "ops"

_native: bool | None = None  # None until load(): whether the compiled kernels run the ops
_why_not = ""
_built: tuple[Path, float] | None = None  # the library load() built, and the seconds it took
_fallback = None  # the torch.library.Library of the fallback ops; kept alive while the process runs


NO_COMPILER = "no C++ compiler found (g++, c++ or $CXX): install one (apt install g++)"


class NativeBuildError(ChatError):
    pass


def library_name() -> str:
    """One file per source, torch version and Python: a library built for another torch is never loaded."""
    import torch

    digest = hashlib.sha256()
    for source in SOURCES:  # each named, so that text moved from one file to the next changes the name too
        digest.update(f"{source.name}\0{source.stat().st_size}\0".encode())
        digest.update(source.read_bytes())
    tag = f"{torch.__version__}-{sys.implementation.cache_tag}-{platform.machine()}"
    return f"chat_native-{digest.hexdigest()[:12]}-{tag.replace('+', '_')}.so"


def cache_dir() -> Path:
    """The user cache: $XDG_CACHE_HOME/chat/native, else ~/.cache/chat/native."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chat" / "native"


def search_path() -> tuple[Path, ...]:
    """Where the library is looked for, in order: $CHAT_NATIVE_DIR alone, else the package's lib/ and the user cache."""
    if os.environ.get("CHAT_NATIVE_DIR"):
        return (Path(os.environ["CHAT_NATIVE_DIR"]).expanduser(),)
    return PACKAGED, cache_dir()


def build_dir() -> Path:
    """Where a build goes: the package's lib/ when this user may write there (shared by every HOME of this
    install), else the user cache; $CHAT_NATIVE_DIR when set."""
    first, *rest = search_path()
    existing = first if first.exists() else first.parent
    return first if not rest or os.access(existing, os.W_OK) else rest[0]


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
    for directory in search_path():
        if (directory / name).is_file():
            return directory / name
    return None


def find_compiler() -> list[str] | None:
    """$CXX (a command, possibly with arguments, as make takes it), else g++ or c++ on PATH; None if none runs."""
    if os.environ.get("CXX"):
        command = shlex.split(os.environ["CXX"])
        path = shutil.which(command[0])
        return [path, *command[1:]] if path else None
    path = shutil.which("g++") or shutil.which("c++")
    return [path] if path else None


def build(directory: Path | None = None, force: bool = False) -> Path:
    """Compile the kernels into `directory` (default: build_dir()) unless it is there (force: even then);
    return the library."""
    directory = Path(directory or build_dir())
    target = directory / library_name()
    with _build_lock(directory):
        if force or not target.is_file():  # else built by whoever held the lock before us
            _compile(target)
    return target


@contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Builds into one directory (other chats, other users of a shared install) take turns: one compiles,
    the others then find its library instead of compiling their own."""
    import fcntl

    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Read-only is enough to lock: another user of a shared install may not own the lock file.
        lock = os.open(directory / ".chat_native.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as why:
        raise NativeBuildError(
            f"cannot write in {directory} ({why.strerror or why}); name a writable directory "
            "(CHAT_NATIVE_DIR, or --into for python -m chat.native)"
        ) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)  # and with it the lock


def _compile(target: Path) -> None:
    """g++ writes a private file, renamed onto `target` whole: a half-written library is never found (and a
    process that loaded the one it replaces keeps that file's inode)."""
    import torch

    # Its import warns "No CUDA runtime is found" with a CUDA build of torch on a machine without a GPU: a
    # line in the middle of the chat about a CUDA toolkit these CPU kernels never use.
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import include_paths, library_paths
    finally:
        cpp_log.setLevel(level)

    compiler = find_compiler()
    if compiler is None:
        raise NativeBuildError(NO_COMPILER)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # No contraction into fused multiply-adds: RoPE rounds each product as torch's ops do.
    flags = ["-O3", "-ffp-contract=off", "-std=c++20", "-fPIC", "-fopenmp", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    flags += [f"-I{path}" for path in include_paths()]
    fd, partial = tempfile.mkstemp(prefix=".chat_native-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(prefix="chat_native-") as scratch:
            units = [(source, str(Path(scratch) / f"{source.stem}.o")) for source in SOURCES if source.suffix == ".cpp"]
            # One g++ per source, all at once: each spends most of its seconds in torch's headers.
            jobs = [
                subprocess.Popen([*compiler, *flags, "-c", str(source), "-o", obj], stderr=subprocess.PIPE, text=True)
                for source, obj in units
            ]
            outputs = [(job, job.communicate()[1]) for job in jobs]  # all waited for, failed or not
            for job, stderr in outputs:
                _check_step(job.returncode, stderr)
            libraries = [f"-L{path}" for path in library_paths()]
            objects = [obj for _, obj in units]
            command = [*compiler, "-shared", "-fopenmp", *objects, *libraries, "-lc10", "-ltorch_cpu", "-o", partial]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            _check_step(done.returncode, done.stderr)
        os.chmod(partial, 0o755)  # mkstemp's 0600 would hide it from other users (the image's, say)
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)


def _check_step(returncode: int, stderr: str) -> None:
    if returncode != 0:
        last = (stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise NativeBuildError(f"building chat's native kernels failed ({last})")


def load() -> bool:
    """Register the torch.ops.chat ops, once per process; True when the compiled kernels run them.

    A missing library is compiled first where this CPU runs it faster than torch's kernels (about 10 s;
    take_built_note() then says where and how long)."""
    global _native, _why_not, _fallback
    if _native is not None:
        return _native
    import torch

    _why_not = buildable() or ""
    path = None if _why_not else find_library()
    if path is None and not _why_not:
        if reason := supported():
            _why_not = reason
        else:
            try:
                path = _build_missing()
            except ChatError as why:
                _why_not = str(why)
    if path is not None:
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as why:
            _why_not = f"chat's native kernels did not load ({str(why).splitlines()[0][:160]})"
            path = None
    _native = path is not None
    if not _native:
        _fallback = fallback_library(OPS)
    return _native


def _build_missing() -> Path:
    """Build the library into build_dir(), unless another process builds it meanwhile (then use theirs)."""
    global _built
    directory = build_dir()
    with _build_lock(directory):
        if found := find_library():
            return found
        start = time.perf_counter()
        _compile(directory / library_name())
        _built = (directory / library_name(), time.perf_counter() - start)
    return _built[0]


def take_built_note() -> str:
    """After load(): the line that says this process built the library, for the first caller only (an export
    and then the chat's backend in one process say it once); else ""."""
    global _built
    if _built is None:
        return ""
    (path, seconds), _built = _built, None
    return f"built chat's native CPU kernels once ({seconds:.1f} s) into {path.parent}"


def fallback_note() -> str:
    """After load() returned False: the one line a chat shows, with what would make the kernels run."""
    if _why_not == NO_COMPILER:
        return "decoding on torch's kernels, slower: install a C++ compiler (apt install g++) and chat builds its own"
    return f"{_why_not}; decoding on torch's own kernels, slower"


def kernels_in_use() -> str:
    """After load(): which kernels run the ops, for !status: "native AVX-512", "native AVX2", or "" (torch's)."""
    if not _native:
        return ""
    import torch

    return {"avx512": "native AVX-512", "avx2": "native AVX2"}.get(torch.ops.chat.instruction_set(), "")


def why_not() -> str:
    """After load() returned False: why torch's own kernels run the ops."""
    return _why_not


def fallback_library(namespace: str) -> torch.library.Library:
    """The ops on torch's kernels, for artifacts that call them where the library is missing, defined as
    torch.ops.<namespace> (load() names OPS; a test, another beside the compiled ones). Keep it alive."""
    import torch
    import torch.nn.functional as F

    from chat.lean.ops import quantized_weights, rotate_half, unit_norm  # the lean module's own steps
    from chat.lean.ops import softcap as cap

    def rms_norm(x: torch.Tensor, eps_root: float | None, weight: torch.Tensor | None) -> torch.Tensor:
        if eps_root is None:
            return x
        unit = unit_norm(x.float(), torch.tensor(eps_root))
        return unit.to(x.dtype) if weight is None else weight * (unit * x.numel() ** 0.5).to(x.dtype)

    def mv(w: torch.Tensor, x: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        if scales is None:
            return torch.mv(w, x)
        if w.dtype == torch.uint8:
            return torch.mv(quantized_weights(w, scales), x.float()).to(x.dtype)
        return (torch.mv(w.float(), x.float()) * scales).to(x.dtype)  # int8 rows: summed in float32, then scaled

    def matvec(w, x, eps_root=None, norm_weight=None, scales=None):
        return mv(w, rms_norm(x, eps_root, norm_weight), scales)

    def silu_mul_matvec(w, x, eps_root=None, norm_weight=None, scales=None):
        gate, up = matvec(w, x, eps_root, norm_weight, scales).chunk(2)
        return F.silu(gate) * up

    def gelu_tanh_mul_matvec(w, x, eps_root=None, norm_weight=None, scales=None):
        gate, up = matvec(w, x, eps_root, norm_weight, scales).chunk(2)
        return F.gelu(gate, approximate="tanh") * up

    def cache_attend(  # see attention.cpp
        qkv, cos, sin, k_cache, v_cache, positions, window, scale=None, softcap=None, sliding_window=None
    ):
        kv_heads, d = k_cache.size(1), k_cache.size(3)
        heads = qkv.numel() // d - 2 * kv_heads
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d])

        def rope(x: torch.Tensor, count: int) -> torch.Tensor:
            x = x.reshape(count, d)
            return x if cos is None else rotate_half(x, cos, sin, cos.numel())

        k_cache.index_copy_(2, positions, rope(k, kv_heads).reshape(1, kv_heads, 1, d))
        v_cache.index_copy_(2, positions, v.reshape(1, kv_heads, 1, d))
        n = window.size(0)
        start = max(0, n - sliding_window) if sliding_window else 0
        q = rope(q, heads).reshape(1, kv_heads, heads // kv_heads, d)
        keys, values = k_cache[:, :, start:n], v_cache[:, :, start:n]
        if softcap is None:
            return F.scaled_dot_product_attention(q, keys, values, scale=scale).reshape(-1)
        # SDPA takes no soft cap: the scores explicitly, in float32 at least, as the kernels compute them.
        wide = torch.promote_types(q.dtype, torch.float32)
        scores = torch.matmul(q.to(wide), keys.to(wide).transpose(2, 3)) * (d**-0.5 if scale is None else scale)
        scores = cap(scores, softcap)
        return torch.matmul(scores.softmax(-1), values.to(wide)).to(q.dtype).reshape(-1)

    library = torch.library.Library(namespace, "DEF")
    matvec_schema = (
        "(Tensor w, Tensor x, float? unit_norm=None, Tensor? norm_weight=None, Tensor? scales=None) -> Tensor"
    )
    for name, schema, kernel in (
        ("matvec", matvec_schema, matvec),
        ("silu_mul_matvec", matvec_schema, silu_mul_matvec),
        ("gelu_tanh_mul_matvec", matvec_schema, gelu_tanh_mul_matvec),
        (
            "add_matvec",
            "(Tensor r, Tensor w, Tensor x, Tensor? scales=None) -> Tensor",
            lambda r, w, x, scales=None: r + mv(w, x, scales),
        ),
        (
            "dequantize",
            "(Tensor w, Tensor scales, Tensor like) -> Tensor",
            lambda w, scales, like: quantized_weights(w, scales).to(like.dtype),
        ),
        (
            "cache_attend",
            "(Tensor qkv, Tensor? cos, Tensor? sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions, "
            "Tensor window, float? scale=None, float? softcap=None, int? sliding_window=None) -> Tensor",
            cache_attend,
        ),
    ):
        library.define(name + schema)
        library.impl(name, kernel, "CompositeExplicitAutograd")
    return library
