"""Export on first use: a model of a family the native core runs, with no artifact for this device, is
exported once into chat's artifact cache (chat.artifact_cache) before it is loaded, so that even the first
`chat MODEL` runs on TorchScript.

The export runs `python -m chat.export` in a child process: its memory is returned when it ends, a crash
of it is one failed export rather than a lost chat, and its progress lines are shown as they come. Ctrl+C
stops it (the exporter writes nothing half done) and this run goes on with transformers. Whatever keeps an
export from happening (a read-only cache, too little disk or memory, a family the exporter lacks, a failed
export) is one line, and the chat runs on transformers. Standard library only until the child starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from chat.artifact import FAMILIES, is_artifact
from chat.artifact_cache import Target, entry_for, failure, locked, prune_replaced, record_failure
from chat.backends.base import LoadOptions
from chat.backends.select import export_target, find_artifact
from chat.jsonfile import MODEL_CONFIG_MAX_BYTES, JSONFileError, NoSuchFile, read_json
from chat.signals import Closed

Say = Callable[[str], None]
# Measured on a 2-core machine for the demo model (135M parameters): 25 s in all, 1.4 GB peak.
SECONDS_FIXED, SECONDS_PER_BILLION = 8.0, 130.0
BYTES_PER_PARAMETER, MEMORY_FIXED = 12, 600 << 20
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def export_if_needed(options: LoadOptions, source: Path, say: Say, *, progress: bool) -> None:
    """Make the artifact `--backend auto` will look for, if it is missing and can be made; say what happens.

    source: the model as a local directory or GGUF file. progress: show the exporter's lines as they come
    (at a terminal); otherwise only the first and the last line are said."""
    if getattr(sys, "frozen", False):
        return  # the standalone chat has no transformers to export with
    load = dataclasses.replace(options, model=str(source))
    if find_artifact(load)[0] is not None:
        return
    model_type = _model_type(source)
    if model_type == "":
        return
    if model_type is not None and model_type not in FAMILIES:
        say(f"({model_type} models do not run on chat's native core yet: running on transformers)")
        return
    target = export_target(load)
    entry = entry_for(source, target)
    earlier = failure(entry)
    if earlier is not None:
        say(
            f"(not exported: it failed before ({earlier}); running on transformers; chat --cache-remove {entry.name}"
            " tries again)"
        )
        return
    problem = _room_problem(entry, source, target)
    if problem is not None:
        say(f"(not exported to chat's native core: {problem}; running on transformers)")
        return
    seconds = SECONDS_FIXED + SECONDS_PER_BILLION * _parameters(source) / 1e9
    say(
        f"making a native artifact of {source.name} for {target.label}, once: ~{seconds:.0f} s "
        "(Ctrl+C runs transformers this time; --no-export never does this)"
    )
    try:
        with locked(entry, lambda: say("another chat is making it; waiting for that one")):
            if is_artifact(entry):
                say(f"made by the other chat, cached in {entry}")
                return
            _run_export(source, entry, target, say, progress)
    except KeyboardInterrupt:
        say("stopped: nothing was kept; running on transformers this time")
    except OSError as why:
        say(f"(not exported: the artifact cache could not be used ({why.strerror or why}); running on transformers)")


def _run_export(source: Path, entry: Path, target: Target, say: Say, progress: bool) -> None:
    command = [sys.executable, "-m", "chat.export", str(source.resolve()), str(entry)]
    command += [f"--device={target.device}", f"--dtype={target.dtype}"]
    command += [f"--quantize={target.quantization}"] if target.quantization else []
    started = time.monotonic()
    # cwd: the cache, so that a chat/ folder where the user stands is not imported as this package.
    child = subprocess.Popen(command, cwd=entry.parent, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    last = ""
    try:
        assert child.stderr is not None
        for line in child.stderr:
            line = line.rstrip()
            if line:
                last = line
                if progress:
                    say(f"  {line}")
        code = child.wait()
    except KeyboardInterrupt:  # the terminal gave the exporter the same Ctrl+C: let it clean up
        _stop(child, interrupt=False)
        raise
    except Closed:
        _stop(child, interrupt=True)
        raise
    if code == 0 and is_artifact(entry):
        removed = prune_replaced(entry)
        replaced = f"; replaced {len(removed)} older one(s)" if removed else ""
        say(f"made in {time.monotonic() - started:.0f} s, cached in {entry}{replaced}")
        return
    why = last.removeprefix("chat.export: ") or f"exit code {code}"
    if code < 0:  # killed (out of memory, say): not this model's fault, so it may be tried again
        say(f"(the export was killed by {signal.Signals(-code).name}: running on transformers)")
        return
    record_failure(entry, why)
    say(f"(could not export: {why}; running on transformers)")


def _stop(child: subprocess.Popen, interrupt: bool) -> None:
    """The exporter removes its partial files on SIGINT (a second one could cut that short); kill it if it
    lingers, and the next export under the lock removes what it left."""
    if interrupt:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGINT)
    try:
        child.wait(timeout=15)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _model_type(source: Path) -> str | None:
    """config.json's model_type; "" where a file export reads is damaged (transformers then names the fault)."""
    if source.is_file():
        return None  # a GGUF file: the exporter reads its architecture
    try:
        read_json(source / "generation_config.json", "a generation config", MODEL_CONFIG_MAX_BYTES)
    except NoSuchFile:
        pass
    except JSONFileError:
        return ""
    try:
        value = read_json(source / "config.json", "a model config", MODEL_CONFIG_MAX_BYTES).get("model_type")
    except (JSONFileError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def _parameters(source: Path) -> float:
    """About how many parameters the model has, from its weight files' sizes."""
    if source.is_file():
        return source.stat().st_size * 2  # GGUF: about 4 to 8 bits a weight
    try:
        config = read_json(source / "config.json", "a model config", MODEL_CONFIG_MAX_BYTES)
        stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    except (JSONFileError, AttributeError):
        stored = "float32"
    files = [*source.glob("*.safetensors")] or [*source.glob("*.bin")]
    return sum(p.stat().st_size for p in files) / _DTYPE_BYTES.get(str(stored), 4)


def _room_problem(entry: Path, source: Path, target: Target) -> str | None:
    """Why the export cannot run here: a cache that cannot be written, too little disk or memory."""
    root = entry.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=root).cleanup()
    except OSError as why:
        return f"the artifact cache {root} cannot be written ({why.strerror or why}; set CHAT_ARTIFACTS_DIR)"
    parameters = _parameters(source)
    artifact_bytes = parameters * (1 if target.quantization else _DTYPE_BYTES[target.dtype]) * 1.1
    free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
    if free < artifact_bytes + (256 << 20):
        return f"{_gib(artifact_bytes)} GiB needed in {root}, {_gib(free)} GiB free"
    available = _available_memory()
    needed = parameters * BYTES_PER_PARAMETER + MEMORY_FIXED
    if available is not None and available < needed:
        return f"the export needs about {_gib(needed)} GiB of memory, {_gib(available)} GiB is free"
    return None


def _available_memory() -> int | None:
    """MemAvailable, or the cgroup's room when a container limit is lower."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = next(int(line.split()[1]) << 10 for line in meminfo.splitlines() if line.startswith("MemAvailable"))
    except (OSError, StopIteration, ValueError):
        return None
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    return available


def _gib(size: float) -> str:
    return f"{size / (1 << 30):.1f}"
