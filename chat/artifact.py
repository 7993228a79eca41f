"""The TorchScript artifact directory and its manifest, chat-artifact.json: reading, writing, checking.

Only the standard library here, so reading a manifest stays small and fast.
Every fault is an ArtifactError whose message is one line that names the fix.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from chat.errors import ChatError
from chat.jsonfile import MANIFEST_MAX_BYTES, JSONFileError, NoSuchFile, read_json
from chat.lean import shape as lean_shape

MANIFEST = "chat-artifact.json"
FORMAT = "chat-torchscript-artifact"
FORMAT_VERSION = 2  # 2: the chat.lean module (its cache inside each layer's attention), the model's own context
KNOWN_OPS = ("chat",)
QUANTIZATIONS = ("int8", "int4")  # of the matmul weights (export --quantize); none when absent
MODEL_FILE = "model.ts"
# The model types export takes (config.json's model_type), each with the family of module it becomes
# (chat.export.families.TRAITS): mistral and qwen2 are llama-shaped (qwen2 adds q/k/v biases).
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "granite": "granite",
    "olmo2": "olmo2",
    "smollm3": "smollm3",
}
# Where a model directory keeps its exports: <model_dir>/torchscript/<device>-<dtype>/.
ARTIFACTS_SUBDIR = "torchscript"
_HASH_BLOCK = 4 << 20


class ArtifactError(ChatError):
    """The artifact cannot be used as it is (missing, changed, foreign, or for another device)."""


def is_artifact(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def model_label(model: str) -> str:
    """A model's short name, for labels: the model directory's (also for an artifact exported into its
    torchscript/ folder, as make demo does), or the Hub id's last part."""
    path = Path(model.rstrip("/"))
    if path.parent.name == ARTIFACTS_SUBDIR and path.parent.parent.name:
        path = path.parent.parent
    return path.name or model


def artifact_dir_for(model_dir: Path, device_type: str, dtype: str) -> Path:
    return model_dir / ARTIFACTS_SUBDIR / f"{device_type}-{dtype}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(_HASH_BLOCK)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            digest.update(view[:n])  # hashlib drops the GIL on big blocks: this runs beside torch's import
    return digest.hexdigest()


def describe_files(directory: Path) -> dict[str, dict[str, Any]]:
    """{name: {size, sha256}} for every file in the directory but the manifest."""
    return {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": describe_files(directory)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    fix = f"re-export it: python -m chat.export SOURCE_MODEL {directory}"
    try:
        manifest = read_json(path, "a chat TorchScript manifest", MANIFEST_MAX_BYTES)
    except NoSuchFile:
        raise ArtifactError(f"{directory} has no {MANIFEST}, so it is not a TorchScript artifact; {fix}") from None
    except JSONFileError as why:
        raise ArtifactError(f"{path} is broken ({why.reason}); {fix}") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a chat TorchScript manifest; {fix}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{directory} has artifact format {version}, this chat reads format {FORMAT_VERSION}; {fix}"
        )
    required = ("architecture", "dtype", "device", "max_len", "shape", "files", "eos_token_ids", "torch_version")
    missing = [key for key in required if key not in manifest]
    if missing or not isinstance(manifest["files"], dict) or MODEL_FILE not in manifest["files"]:
        raise ArtifactError(f"{path} lacks {', '.join(missing) or 'the model file entry'}; {fix}")
    valid = (
        manifest["dtype"] in ("float32", "bfloat16", "float16")
        and manifest["device"] in ("cpu", "cuda")
        and isinstance(manifest["max_len"], int)
        and manifest["max_len"] > 0
        and isinstance(manifest["shape"], dict)
        and set(manifest["shape"]) == lean_shape.FIELDS
    )
    if not valid or not _valid_shape(manifest["shape"]):
        raise ArtifactError(f"{path} has invalid values (dtype, device, max_len or shape); {fix}")
    eos = manifest["eos_token_ids"]
    if not (isinstance(eos, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in eos)):
        raise ArtifactError(f"{path} has invalid eos_token_ids (a list of token ids); {fix}")
    if manifest.get("quantization") not in (None, *QUANTIZATIONS):
        raise ArtifactError(f"{path} has weights quantized as {manifest['quantization']!r}, unknown here; {fix}")
    ops = manifest.get("ops", [])  # torch.ops namespaces the module calls besides aten (see chat.native)
    if not (isinstance(ops, list) and all(op in KNOWN_OPS for op in ops)):
        raise ArtifactError(f"{path} needs ops this chat does not provide ({ops!r}); {fix}")
    for name, entry in manifest["files"].items():
        # Plain names in the artifact directory, each with its size and hash.
        if not (
            isinstance(name, str)
            and name == Path(name).name
            and name not in ("", ".", "..")
            and isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
        ):
            raise ArtifactError(f"{path} lists the file {name!r} without a plain name, size and sha256; {fix}")
    return manifest


def _valid_shape(shape: dict[str, Any]) -> bool:
    def count(value: Any, least: int = 1) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    sizes = ("vocab_size", "hidden_size", "layers", "heads", "kv_heads", "head_dim")
    scalars = ("norm_eps", "attn_scale", "attn_softcap", "final_softcap", "embed_scale", "residual_scale")
    per_layer = ("windows", "rope_tables")
    return (
        all(count(shape[k]) for k in sizes)
        and count(shape["rotary_dim"], 0)
        and shape["heads"] % shape["kv_heads"] == 0
        and all(number(shape[k]) for k in (*scalars, "logits_divisor"))
        and shape["logits_divisor"] != 0
        and shape["norm"] in lean_shape.NORMS
        and shape["norm_placement"] in lean_shape.PLACEMENTS
        and shape["activation"] in lean_shape.ACTIVATIONS
        and shape["mlp"] in lean_shape.MLPS
        and shape["qk_norm"] in lean_shape.QK_NORMS
        and isinstance(shape["family"], str)
        and isinstance(shape["embed_scale_in_dtype"], bool)
        and all(isinstance(shape[k], list) and len(shape[k]) == shape["layers"] for k in per_layer)
        and all(count(w, 0) for w in shape["windows"])
        and all(isinstance(t, int) and t >= -1 for t in shape["rope_tables"])
    )


def check_sizes(directory: Path, manifest: dict[str, Any]) -> None:
    """Cheap checks first: every listed file is there with its recorded size."""
    fix = "re-export the artifact"
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; {fix}")
        size = path.stat().st_size
        if size != entry["size"]:  # read_manifest checked every entry has one
            raise ArtifactError(f"{path} has {size} bytes, the manifest says {entry['size']} (truncated?); {fix}")


class HashCheck:
    """Hashes an artifact's files in a thread. torch.jit.load holds the GIL, so little hashing gets done beside
    it; a check started before torch is imported (prefetch_hashes) is done by the time the model loads."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.directory, self.manifest = directory, manifest
        self._error: ArtifactError | None = None
        self._thread = threading.Thread(target=self._run, name="artifact-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._error = self._first_problem()
        except Exception:  # fails closed: whatever goes wrong, the artifact is not taken as verified
            self._error = ArtifactError(f"{self.directory}: its files could not be checked; re-export the artifact")

    def _first_problem(self) -> ArtifactError | None:
        for name, entry in self.manifest["files"].items():
            path = self.directory / name
            try:
                digest = sha256_file(path)
            except OSError as why:
                return ArtifactError(f"{path} could not be read ({why}); re-export the artifact")
            if digest != entry["sha256"]:
                return ArtifactError(f"{path} was changed since export (sha256 differs); re-export the artifact")
        return None

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def device_problem(manifest: dict[str, Any], cuda_available: bool) -> str | None:
    if manifest["device"] == "cuda" and not cuda_available:
        return "it was exported for CUDA and CUDA is not available here; export one with --device=cpu"
    return None


_prefetched: dict[Path, HashCheck] = {}


def prefetch_hashes(directory: Path) -> None:
    """Start hashing an artifact before torch is imported, which takes a second and one core; the backend
    takes the running check over (hash_check)."""
    try:
        manifest = read_manifest(directory)
    except ArtifactError:
        return  # reported if this artifact is the one chosen
    _prefetched[directory.resolve()] = HashCheck(directory, manifest)


def hash_check(directory: Path, manifest: dict[str, Any]) -> HashCheck:
    """The check prefetch_hashes started for this directory and manifest, or a new one."""
    early = _prefetched.pop(directory.resolve(), None)
    return early if early is not None and early.manifest == manifest else HashCheck(directory, manifest)


def drop_prefetched() -> None:
    """Forget checks not taken, so that a later load (of files changed since) hashes afresh."""
    _prefetched.clear()
