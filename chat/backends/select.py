"""Pick and load the backend for a model: TorchScript where an artifact fits this device, else transformers.

`--backend auto`: an artifact directory, or a model directory holding an artifact exported for this device
(MODEL_DIR/torchscript/DEVICE-DTYPE/), runs on TorchScript; anything else on transformers. When an artifact
that auto chose cannot be loaded, auto runs transformers on the source checkpoint if it is at hand and says
why in one line (`info.notes`). `--backend torchscript` never falls back. `info.reason` says why a backend
was chosen (shown by !status).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from chat.artifact import (
    ARTIFACTS_SUBDIR,
    MANIFEST,
    artifact_dir_for,
    drop_prefetched,
    is_artifact,
    prefetch_hashes,
)
from chat.backends.base import Backend, LoadOptions
from chat.errors import ChatError, UsageError
from chat.jsonfile import MANIFEST_MAX_BYTES, JSONFileError, read_json

CHOICES = ("auto", "torchscript", "transformers")


def load_backend(options: LoadOptions, choice: str = "auto") -> Backend:
    if choice not in CHOICES:
        raise UsageError(f"--backend {choice}: use one of {', '.join(CHOICES)}")
    if choice == "transformers":
        return _transformers_only(options)
    likely = _likely_artifact(options)
    if likely is not None:
        prefetch_hashes(likely)
    try:
        return _load_preferring_torchscript(options, choice)
    finally:
        drop_prefetched()


def _load_preferring_torchscript(options: LoadOptions, choice: str) -> Backend:
    artifact, why = find_artifact(options)
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
    """The artifact directory for these options and why it was picked, or None and why there is none."""
    path = Path(options.model).expanduser()
    if not path.is_dir():
        return None, f"{options.model} is not a local directory; TorchScript needs an exported artifact"
    if is_artifact(path):
        return path, f"{path} is a TorchScript artifact"
    device_type = _device_type(options.device)
    dtypes = [options.dtype] if options.dtype != "auto" else preferred_dtypes(device_type)
    candidates = [artifact_dir_for(path, device_type, dtype) for dtype in dtypes]
    # A directory without its manifest still counts, so that its fault is reported rather than ignored.
    for found in [c for c in candidates if (c / MANIFEST).is_file()] + [c for c in candidates if c.is_dir()]:
        return found, f"{path} has an artifact exported for {device_type}: {found}"
    target = candidates[0]
    return None, (
        f"no TorchScript artifact for {device_type} in {path / ARTIFACTS_SUBDIR} "
        f"(make one: python -m chat.export {path} {target} --device={device_type} --dtype={dtypes[0]})"
    )


def preferred_dtypes(device_type: str) -> list[str]:
    """The order in which `--dtype auto` takes a model directory's artifacts: the fastest first.

    CUDA: bfloat16. CPU: bfloat16 where the processor computes it natively (AVX-512 BF16/AMX), else float32.
    """
    if device_type == "cuda":
        return ["bfloat16", "float16", "float32"]
    import torch

    try:
        native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a private probe: absent in some torch builds
        native_bf16 = False
    if native_bf16:
        return ["bfloat16", "float32", "float16"]
    return ["float32", "bfloat16", "float16"]


def source_checkpoint(artifact: Path, options: LoadOptions) -> Path | None:
    """The transformers checkpoint an artifact came from, if it is on this machine."""
    candidates = []
    named = Path(options.model).expanduser()
    if named.is_dir() and not is_artifact(named) and artifact != named:
        candidates.append(named)  # the artifact was found inside this model directory
    if artifact.parent.name == ARTIFACTS_SUBDIR:
        candidates.append(artifact.parent.parent)
    try:
        recorded = read_json(artifact / MANIFEST, "a chat TorchScript manifest", MANIFEST_MAX_BYTES)["source"]["path"]
        candidates.append(Path(recorded))
    except (JSONFileError, KeyError, TypeError):
        pass  # a broken manifest: the directory layout may still tell
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _likely_artifact(options: LoadOptions) -> Path | None:
    """The artifact find_artifact will most likely pick, guessed without importing torch (a wrong guess
    costs some hashing, nothing else): CUDA where an NVIDIA driver is loaded, bfloat16 on a CPU that lists
    AVX-512 BF16 or AMX."""
    path = Path(options.model).expanduser()
    if not path.is_dir():
        return None
    if is_artifact(path):
        return path
    device = options.device
    if device == "auto":
        device = "cuda" if Path("/proc/driver/nvidia/version").is_file() else "cpu"
    device_type = _device_type(device)
    dtype = options.dtype
    if dtype == "auto":
        try:
            cpu_flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpu_flags = ""
        native_bf16 = "avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags
        dtype = "bfloat16" if device_type == "cuda" or native_bf16 else "float32"
    return artifact_dir_for(path, device_type, dtype)


def _device_type(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


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
