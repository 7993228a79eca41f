"""Backend choice: auto finds artifacts, every artifact fault is refused by --backend torchscript
in one line and handled by auto (fallback to transformers with a note, or one error naming each cause)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chat.artifact import MANIFEST, artifact_dir_for
from chat.backends.base import LoadOptions
from chat.backends.select import find_artifact, load_backend
from chat.errors import ChatError
from chat.export import export


@pytest.fixture(scope="session")
def exported(tiny_llama, tmp_path_factory) -> Path:
    """The tiny llama model directory with a float32 CPU artifact in its usual place."""
    model = tmp_path_factory.mktemp("select") / "model"
    shutil.copytree(tiny_llama, model)
    export(str(model), artifact_dir_for(model, "cpu", "float32"), max_len=64)
    return model


@pytest.fixture
def model(exported, tmp_path) -> Path:
    """A private copy to damage."""
    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    return copy


def artifact_of(model: Path) -> Path:
    return artifact_dir_for(model, "cpu", "float32")


def load(model: Path, choice: str = "auto", **options):
    return load_backend(LoadOptions(model=str(model), device="cpu", **options), choice)


def truncate(artifact: Path) -> None:
    path = artifact / "model.ts"
    path.write_bytes(path.read_bytes()[:1000])


def change(artifact: Path) -> None:
    path = artifact / "model.ts"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))


def break_manifest(artifact: Path) -> None:
    (artifact / MANIFEST).write_text('{"format": "chat-torchscript-artifact", ')


def foreign_manifest(artifact: Path) -> None:
    (artifact / MANIFEST).write_text(json.dumps({"format": "something-else", "files": {}}))


def future_format(artifact: Path) -> None:
    _edit_manifest(artifact, format_version=99)


def bad_values(artifact: Path) -> None:
    _edit_manifest(artifact, dtype="int4")


def remove_file(artifact: Path) -> None:
    (artifact / "tokenizer.json").unlink()


def bad_file_entry(artifact: Path) -> None:
    _edit_manifest(artifact, "files", **{"model.ts": 5})


def escaping_file_name(artifact: Path) -> None:
    _edit_manifest(artifact, "files", **{"../config.json": {"size": 1, "sha256": "0" * 64}})


def bad_eos(artifact: Path) -> None:
    _edit_manifest(artifact, eos_token_ids=5)


def bad_shape(artifact: Path) -> None:
    _edit_manifest(artifact, "shape", kv_heads="x")


def cuda_artifact(artifact: Path) -> None:
    _edit_manifest(artifact, device="cuda")


def _edit_manifest(artifact: Path, within: str | None = None, **changes) -> None:
    """Rewrite the manifest with `changes` at its top level, or inside its `within` table."""
    manifest = json.loads((artifact / MANIFEST).read_text())
    (manifest[within] if within else manifest).update(changes)
    (artifact / MANIFEST).write_text(json.dumps(manifest))


FAULTS = {
    "truncated file": (truncate, "truncated"),
    "changed file": (change, "changed since export"),
    "broken manifest": (break_manifest, "is broken"),
    "foreign manifest": (foreign_manifest, "not a chat TorchScript manifest"),
    "future format": (future_format, "format 99"),
    "invalid values": (bad_values, "invalid values"),
    "eos ids not a list": (bad_eos, "invalid eos_token_ids"),
    "shape with a non-number": (bad_shape, "invalid values"),
    "file entry without size and hash": (bad_file_entry, "without a plain name, size and sha256"),
    "file name outside the artifact": (escaping_file_name, "without a plain name, size and sha256"),
    "missing file": (remove_file, "missing"),
    "CUDA artifact without CUDA": (cuda_artifact, "CUDA is not available"),
}


def test_auto_picks_the_artifact_of_a_model_directory(model):
    backend = load(model)
    assert backend.info.name == "torchscript"
    assert backend.info.context_length == 64
    assert "artifact exported for cpu" in backend.info.reason
    assert backend.info.notes == []


def test_auto_takes_an_artifact_directory(model):
    backend = load(artifact_of(model))
    assert backend.info.name == "torchscript" and "is a TorchScript artifact" in backend.info.reason


def test_auto_without_artifact_runs_transformers(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("CHAT_ARTIFACTS_DIR", str(tmp_path))  # none exported on first use either
    backend = load(tiny_llama)
    assert backend.info.name == "transformers"
    assert "no TorchScript artifact for cpu" in backend.info.reason
    assert "python -m chat.export " in backend.info.reason


def test_explicit_backends(model):
    assert load(model, "transformers").info.name == "transformers"
    assert load(model, "torchscript").info.name == "torchscript"
    on_source = load(artifact_of(model), "transformers")  # the artifact's source checkpoint
    assert on_source.info.name == "transformers" and str(model) in on_source.info.reason


def test_dtype_picks_the_artifact(model):
    assert load(model, dtype="float32").info.name == "torchscript"
    fallback = load(model, dtype="bfloat16")  # no cpu-bfloat16 artifact here
    assert fallback.info.name == "transformers" and "cpu-bfloat16" in fallback.info.reason
    with pytest.raises(ChatError, match="not bfloat16"):
        load(artifact_of(model), "torchscript", dtype="bfloat16")


def test_torchscript_without_artifact_names_the_export_command(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("CHAT_ARTIFACTS_DIR", str(tmp_path))
    with pytest.raises(ChatError, match=r"python -m chat\.export ") as error:
        load(tiny_llama, "torchscript")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("fault", FAULTS)
def test_torchscript_refuses_a_faulty_artifact(model, fault):
    damage, message = FAULTS[fault]
    damage(artifact_of(model))
    with pytest.raises(ChatError, match=message) as error:
        load(model, "torchscript")
    text = str(error.value)
    assert "\n" not in text
    assert "re-export" in text or "--device=cpu" in text  # names the fix


@pytest.mark.parametrize("fault", FAULTS)
def test_auto_falls_back_to_transformers_and_says_why(model, fault):
    damage, message = FAULTS[fault]
    damage(artifact_of(model))
    for named in (model, artifact_of(model)):  # found in the model directory, or named directly
        backend = load(named)
        assert backend.info.name == "transformers"
        assert "fell back" in backend.info.reason
        assert len(backend.info.notes) == 1 and message in backend.info.notes[0]
        assert "\n" not in backend.info.notes[0]


def test_auto_without_source_checkpoint_is_one_error(model, tmp_path):
    lone = tmp_path / "lone"
    shutil.copytree(artifact_of(model), lone)
    _edit_manifest(lone, source={"model": "gone", "path": str(tmp_path / "gone")})
    truncate(lone)
    with pytest.raises(ChatError, match="source checkpoint is not at hand") as error:
        load(lone)
    assert "\n" not in str(error.value) and "truncated" in str(error.value)


def test_every_path_failing_names_each_cause(model):
    truncate(artifact_of(model))
    (model / "model.safetensors").unlink()
    with pytest.raises(ChatError) as error:
        load(model)
    text = str(error.value)
    assert "transformers:" in text and "torchscript:" in text and "truncated" in text and "weights" in text
    assert "\n" not in text


def test_find_artifact_reports_a_hub_id():
    artifact, why = find_artifact(LoadOptions(model="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert artifact is None and "not a local directory" in why


def test_hashing_starts_before_torch_on_the_likely_artifact(model, monkeypatch):
    """The artifact's hash check starts before torch is imported (it then overlaps that import) and is the
    one the backend waits on; a file changed after one load is still caught by the next."""
    import chat.artifact

    artifact = artifact_of(model)
    assert find_artifact(LoadOptions(model=str(model), device="cpu", dtype="float32"))[0] == artifact
    assert find_artifact(LoadOptions(model=str(artifact)))[0] == artifact
    started = []

    class Counted(chat.artifact.HashCheck):
        def __init__(self, *args):
            super().__init__(*args)
            started.append(self)

    monkeypatch.setattr(chat.artifact, "HashCheck", Counted)
    load(model, "torchscript", dtype="float32")
    assert len(started) == 1 and chat.artifact._prefetched == {}
    change(artifact)
    with pytest.raises(ChatError, match="sha256 differs"):
        load(model, "torchscript", dtype="float32")


def test_hash_check_fails_closed(model, monkeypatch):
    """Anything unexpected while hashing refuses the artifact rather than taking it as verified."""
    import chat.artifact

    def broken(path):
        raise ValueError("unexpected")

    monkeypatch.setattr(chat.artifact, "sha256_file", broken)
    artifact = artifact_of(model)
    check = chat.artifact.HashCheck(artifact, chat.artifact.read_manifest(artifact))
    with pytest.raises(ChatError, match="could not be checked"):
        check.result()
