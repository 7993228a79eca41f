"""chat's cache of artifacts exported on first use: where they live, what names one, listing and removal.

An entry is an artifact directory, $CHAT_ARTIFACTS_DIR (else $XDG_CACHE_HOME/chat/artifacts, that is
~/.cache/chat/artifacts) / LABEL-DEVICE-DTYPE[-int8|-int4]-KEY. KEY hashes what makes the artifact valid: the
source (a Hub snapshot's repo and revision; a directory's or a GGUF file's path with the size and mtime of
each file export reads), the device, dtype, quantization and context, the torch version, the artifact
format and the exporter's own source. A source changed in place, another torch or a newer chat makes a new
key; the entry it replaces is removed when the new one is written.

An export that failed leaves LABEL-...-KEY.failed, one line saying why, so later runs do not try again;
removing the entry (chat --cache-remove NAME) removes that too. Standard library only: the chat decides
before torch is imported whether an export is needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from chat.artifact import FORMAT_VERSION, is_artifact, model_label, read_manifest
from chat.errors import ChatError, UsageError, file_error

# The files an export reads from a model directory: a change to any of them makes a new entry.
SOURCE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
FAILED_SUFFIX = ".failed"
_EXPORTER = (Path(__file__).with_name("export"), Path(__file__).with_name("lean"))  # what an export runs


def cache_root() -> Path:
    if os.environ.get("CHAT_ARTIFACTS_DIR"):
        return Path(os.environ["CHAT_ARTIFACTS_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chat" / "artifacts"


@dataclass(frozen=True)
class Target:
    """What an export makes: for which device, in which dtype, with which weights, up to which length."""

    device: str  # "cpu" or "cuda"
    dtype: str  # "float32", "bfloat16" or "float16"
    quantization: str | None = None  # "int8", "int4" or None
    max_len: int | None = None  # None: the model's own limit (the exporter's default)

    @property
    def label(self) -> str:
        return f"{self.device}-{self.dtype}" + (f"-{self.quantization}" if self.quantization else "")


def entry_for(source: Path, target: Target) -> Path:
    """The cache directory for `source` (a model directory, a Hub snapshot or a GGUF file) made for `target`."""
    digest = hashlib.sha256()
    for part in (
        source_identity(source),
        target.label,
        str(target.max_len),
        _torch_version(),
        str(FORMAT_VERSION),
        _exporter_digest(),
    ):
        digest.update(part.encode() + b"\n")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", model_label(str(source)).removesuffix(".gguf"))[:60] or "model"
    return cache_root() / f"{name}-{target.label}-{digest.hexdigest()[:16]}"


def source_identity(source: Path) -> str:
    """A line that changes when what export reads from `source` changes (without hashing gigabytes)."""
    if source.parent.name == "snapshots":  # a Hub snapshot: its revision names the files for good
        return f"hub {source.parent.parent.name} {source.name}"
    source = source.resolve()
    if source.is_file():
        files = [source]
    else:
        files = [source / name for name in SOURCE_FILES if (source / name).is_file()]
        files += sorted(p for pattern in WEIGHT_PATTERNS for p in source.glob(pattern))
    stats = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return f"path {source} " + " ".join(stats)


def _torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "none"


@functools.cache  # the installed code does not change while chat runs
def _exporter_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(p for folder in _EXPORTER for p in folder.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def failure(entry: Path) -> str | None:
    """Why an earlier export of this entry failed, if one did."""
    try:
        return entry.with_name(entry.name + FAILED_SUFFIX).read_text(encoding="utf-8").strip()[:300] or "failed"
    except OSError:
        return None


def record_failure(entry: Path, why: str) -> None:
    with contextlib.suppress(OSError):
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.with_name(entry.name + FAILED_SUFFIX).write_text(why.strip() + "\n", encoding="utf-8")


@contextlib.contextmanager
def locked(entry: Path, waiting: Callable[[], None]) -> Iterator[None]:
    """Hold the entry's lock (one exporter per entry across processes); `waiting()` is called first if another
    process holds it. Leftovers of an export that was killed are removed once the lock is ours."""
    locks = entry.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{entry.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        for partial in entry.parent.glob(f".{entry.name}.*"):
            shutil.rmtree(partial, ignore_errors=True)
        yield
    finally:
        os.close(fd)


def prune_replaced(entry: Path) -> list[Path]:
    """Remove the entries `entry` replaces: made from the same source for the same target by another torch,
    another chat or an older copy of the source. Returns what was removed."""
    try:
        mine = _slot(entry)
    except ChatError:
        return []
    removed = []
    for other in entries():
        if other == entry:
            continue
        try:
            if _slot(other) == mine:
                shutil.rmtree(other)
                removed.append(other)
        except (ChatError, OSError):
            continue  # not ours to judge, or not ours to remove
    return removed


def _slot(entry: Path) -> tuple:
    manifest = read_manifest(entry)
    source = manifest.get("source", {})
    return (
        source.get("path") if isinstance(source, dict) else None,
        manifest["device"],
        manifest["dtype"],
        manifest.get("quantization"),
        entry.name.rsplit("-", 1)[0],
    )


def entries() -> list[Path]:
    root = cache_root()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_artifact(p))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def describe() -> list[str]:
    """The cache as lines for `chat --cache`: each entry's name, size, what it was made from and when."""
    root = cache_root()
    found = entries()
    failed = sorted(root.glob(f"*{FAILED_SUFFIX}")) if root.is_dir() else []
    if not found and not failed:
        return [f"no artifacts cached in {root}"]
    total = sum(_size(p) for p in found)
    lines = [f"{len(found)} artifact(s), {_human(total)}, in {root} (chat --cache-remove NAME, or all, removes):"]
    for path in found:
        try:
            manifest = read_manifest(path)
            what = f"{manifest['source'].get('model', '?')}, torch {manifest['torch_version']}"
            when = manifest.get("exported_at", "")
        except (ChatError, AttributeError):
            what, when = "unreadable manifest", ""
        lines.append(f"  {path.name}  {_human(_size(path))}  {what}  {when}".rstrip())
    for path in failed:
        lines.append(f"  {path.name.removesuffix(FAILED_SUFFIX)}  export failed: {failure(path.with_suffix(''))}")
    return lines


def remove(name: str) -> list[str]:
    """Remove one entry by name (as `chat --cache` lists it), or all of them; the lines to print."""
    root = cache_root()
    if name == "all":
        targets = entries() + (sorted(root.glob(f"*{FAILED_SUFFIX}")) if root.is_dir() else [])
    else:
        if name != Path(name).name or name.startswith("."):
            raise UsageError(f"--cache-remove {name}: give a name as chat --cache lists it, or all")
        targets = [p for p in (root / name, root / (name + FAILED_SUFFIX)) if p.exists()]
        if not targets:
            raise UsageError(f"--cache-remove {name}: no such entry in {root}; chat --cache lists them")
    freed = 0
    for path in targets:
        if path.is_dir() and not is_artifact(path):
            continue  # only artifacts are ours to remove
        try:
            freed += _size(path) if path.is_dir() else 0
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError as why:
            raise ChatError(f"could not remove {path} ({file_error(why)})") from None
    return [f"removed {len(targets)} entr{'y' if len(targets) == 1 else 'ies'} ({_human(freed)}) from {root}"]
