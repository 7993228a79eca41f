"""Pick and load the backend for a model: TorchScript where an artifact fits this device, else transformers.

`--backend auto`: an artifact directory, a model directory holding an artifact exported for this device
(MODEL_DIR/torchscript/DEVICE-DTYPE/), or a model (directory, Hub snapshot, GGUF file) with an artifact in
chat's cache (chat.artifact_cache, filled by chat.auto_export on first use) runs on TorchScript; anything
else on transformers. When an artifact
that auto chose cannot be loaded, auto runs transformers on the source checkpoint if it is at hand and says
why in one line (`info.notes`). `--backend torchscript` never falls back. `info.reason` says why a backend
was chosen (shown by !status).
"""

from __future__ import annotations

import dataclasses
from importlib import metadata
from pathlib import Path

from chat import native
from chat.artifact import (
    ARTIFACTS_SUBDIR,
    MANIFEST,
    QUANTIZATIONS,
    artifact_dir_for,
    drop_prefetched,
    is_artifact,
    prefetch_hashes,
)
from chat.artifact_cache import Target, entry_for
from chat.backends.base import Backend, LoadOptions
from chat.errors import ChatError, UsageError
from chat.jsonfile import MANIFEST_MAX_BYTES, JSONFileError, read_json

CHOICES = ("auto", "torchscript", "transformers")


def load_backend(options: LoadOptions, choice: str = "auto") -> Backend:
    if choice not in CHOICES:
        raise UsageError(f"--backend {choice}: use one of {', '.join(CHOICES)}")
    if choice == "transformers":
        return _transformers_only(options)
    artifact, why = find_artifact(options)
    if artifact is not None:
        prefetch_hashes(artifact)
    try:
        return _load_preferring_torchscript(options, choice, artifact, why)
    finally:
        drop_prefetched()


def _load_preferring_torchscript(options: LoadOptions, choice: str, artifact: Path | None, why: str) -> Backend:
    if choice == "torchscript":
        if artifact is None:
            raise ChatError(f"--backend torchscript: {why}")
        backend = _torchscript(artifact, options)
        backend.info.reason = f"--backend torchscript ({why})"
        return backend
    if artifact is None:
        local = Path(options.model).expanduser().is_dir()
        return _transformers(options, f"auto: {why}", also_failed=why if local else None)
    try:
        backend = _torchscript(artifact, options)
    except ChatError as ts_error:
        source = source_checkpoint(artifact, options)
        if source is None:
            raise ChatError(
                f"the TorchScript artifact cannot be used: {ts_error}; and its source checkpoint is not at hand "
                "to fall back to transformers: fix the artifact, or name the source model with --model"
            ) from None
        backend = _transformers(
            dataclasses.replace(options, model=str(source)),
            "auto: fell back to transformers, the TorchScript artifact could not be loaded",
            also_failed=f"torchscript: {ts_error}",
        )
        backend.info.model = options.model
        backend.info.notes.append(f"TorchScript not used ({ts_error}); running transformers on {source} instead")
        return backend
    backend.info.reason = f"auto: {why}"
    return backend


def find_artifact(options: LoadOptions) -> tuple[Path | None, str]:
    """The artifact directory for these options and why it was picked, or None and why there is none.
    Decided without importing torch, so its files can be hashed while torch loads."""
    path = Path(options.model).expanduser()
    if path.is_dir() and is_artifact(path):
        return path, f"{path} is a TorchScript artifact"
    device_type = device_type_of(options.device)
    dtypes = [options.dtype] if options.dtype != "auto" else preferred_dtypes(device_type)
    if path.is_dir():
        candidates = [c for c in (artifact_dir_for(path, device_type, d) for d in dtypes) if _weights_fit(c, options)]
        # A directory without its manifest still counts, so that its fault is reported rather than ignored.
        for found in [c for c in candidates if (c / MANIFEST).is_file()] + [c for c in candidates if c.is_dir()]:
            return found, f"{path} has an artifact exported for {device_type}: {found}"
    if options.first_use and (path.is_dir() or path.is_file()):  # a GGUF file is a model too
        cached = entry_for(path, export_target(options))
        if is_artifact(cached):
            return cached, f"exported on first use, cached in {cached}"
    if not path.is_dir():
        return None, f"{options.model} is not a local directory; TorchScript needs an exported artifact"
    target = artifact_dir_for(path, device_type, dtypes[0])
    quantized = f" --quantize={options.quantize}" if options.quantize in QUANTIZATIONS else ""
    return None, (
        f"no TorchScript artifact for {device_type} in {path / ARTIFACTS_SUBDIR} "
        f"(make one: python -m chat.export {path} {target} --device={device_type} --dtype={dtypes[0]}{quantized})"
    )


def _weights_fit(artifact: Path, options: LoadOptions) -> bool:
    """Whether an artifact's weights are what --quantize asks for (any, with auto)."""
    if options.quantize == "auto":
        return True
    try:
        recorded = read_json(artifact / MANIFEST, "a chat TorchScript manifest", MANIFEST_MAX_BYTES).get("quantization")
    except (JSONFileError, AttributeError):
        return True  # missing or broken: taken, so that its fault is reported
    return recorded == (None if options.quantize == "none" else options.quantize)


def export_target(options: LoadOptions) -> Target:
    """What auto exports for these options: the preferred dtype; with --dtype auto on a CPU where chat's
    native kernels run, int8 weights unless --quantize none (docs/performance.md has the figures). int4
    weights run bfloat16 activations."""
    device_type = device_type_of(options.device)
    dtype = options.dtype if options.dtype != "auto" else preferred_dtypes(device_type)[0]
    quantization = None if options.quantize == "none" else options.quantize
    if quantization == "int4":
        dtype = "bfloat16"
    if quantization == "auto":  # an explicit --dtype asks for those weights, unrounded
        native_int8 = device_type == "cpu" and options.dtype == "auto" and _native_kernels_possible()
        quantization = "int8" if native_int8 else None
    return Target(device_type, dtype, quantization)


def preferred_dtypes(device_type: str) -> list[str]:
    """The order in which `--dtype auto` takes a model directory's artifacts: the fastest first.

    CUDA: bfloat16. CPU: bfloat16 where the processor computes it natively (AVX-512 BF16 or AMX), else float32.
    """
    if device_type == "cuda":
        return ["bfloat16", "float16", "float32"]
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if flags & {"avx512_bf16", "amx_bf16"}:
        return ["bfloat16", "float32", "float16"]
    return ["float32", "bfloat16", "float16"]


def source_checkpoint(artifact: Path, options: LoadOptions) -> Path | None:
    """The transformers checkpoint (a directory, or a GGUF file) an artifact came from, if it is on this machine."""
    candidates = []
    named = Path(options.model).expanduser()
    if (named.is_dir() and not is_artifact(named) and artifact != named) or named.is_file():
        candidates.append(named)  # the artifact was found inside this model directory, or cached for it
    if artifact.parent.name == ARTIFACTS_SUBDIR:
        candidates.append(artifact.parent.parent)
    try:
        recorded = read_json(artifact / MANIFEST, "a chat TorchScript manifest", MANIFEST_MAX_BYTES)["source"]["path"]
        candidates.append(Path(recorded))
    except (JSONFileError, KeyError, TypeError):
        pass  # a broken manifest: the directory layout may still tell
    for candidate in candidates:
        if (candidate / "config.json").is_file() or candidate.is_file():
            return candidate
    return None


def _native_kernels_possible() -> bool:
    """Whether chat's native kernels can run quantized weights here: a CPU they support, and their library built
    (for some torch) or a compiler to build it."""
    if native.supported() is not None:
        return False
    if native.find_compiler() is not None:
        return True
    return any(d.is_dir() and any(d.glob("chat_native-*.so")) for d in native.search_path())


def device_type_of(device: str) -> str:
    """cpu or cuda, without importing torch: auto is CUDA where an NVIDIA driver is loaded and torch is a
    CUDA build."""
    if device != "auto":
        return "cuda" if device.startswith("cuda") else "cpu"
    if not Path("/proc/driver/nvidia/version").is_file():
        return "cpu"
    try:
        return "cpu" if "+cpu" in metadata.version("torch") else "cuda"
    except metadata.PackageNotFoundError:
        return "cpu"


def _torchscript(artifact: Path, options: LoadOptions) -> Backend:
    from chat.backends.torchscript_backend import TorchScriptBackend

    return TorchScriptBackend(artifact, options)


def _transformers(options: LoadOptions, reason: str, also_failed: str | None = None) -> Backend:
    from chat.backends.transformers_backend import TransformersBackend

    try:
        backend = TransformersBackend(options)
    except ChatError as why:
        if also_failed is None:
            raise
        raise type(why)(f"no backend could load {options.model}: transformers: {why}; {also_failed}") from None
    backend.info.reason = reason
    return backend


def _transformers_only(options: LoadOptions) -> Backend:
    path = Path(options.model).expanduser()
    if path.is_dir() and is_artifact(path):
        source = source_checkpoint(path, options)
        if source is None:
            raise ChatError(
                f"{path} is a TorchScript artifact and its source checkpoint is not here; "
                "use --backend torchscript, or name the source model with --model"
            )
        backend = _transformers(dataclasses.replace(options, model=str(source)), "")
        backend.info.model = options.model
        backend.info.reason = f"--backend transformers, on the artifact's source checkpoint {source}"
        return backend
    return _transformers(options, "--backend transformers")
