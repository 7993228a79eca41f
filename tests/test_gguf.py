"""GGUF files as models: the demo's real GGUF on transformers and exported to TorchScript, and the one-line
errors for files that are not GGUF or hold an architecture that cannot run. `make test` fetches the GGUF
first (make demo-model), so in CI the demo tests never skip."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chat.backends.base import LoadOptions
from chat.backends.hub import is_gguf, locate_model
from chat.backends.transformers_backend import check_gguf, gguf_architecture, gguf_package_architecture
from chat.errors import ChatError, UsageError
from chat.params import model_recommendations

REPO = Path(__file__).resolve().parent.parent
DEMO_GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
QUESTION = "What is the capital of France?"


def chat(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chat", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"},
    )


def write_gguf(path: Path, architecture: str) -> Path:
    """A tiny GGUF file of `architecture`: metadata and one small tensor, enough for the checks before loading."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch=architecture)
    writer.add_name("tiny")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1 and "Traceback" not in text


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """The demo model's own GGUF file, kept beside it by scripts/fetch_demo_model.py."""
    if not DEMO_GGUF.is_file():
        pytest.skip("demo GGUF file not fetched: run `make demo-model`")
    return DEMO_GGUF


@pytest.fixture(scope="session")
def gguf_artifact(demo_gguf, tmp_path_factory) -> Path:
    """The demo GGUF exported to TorchScript for the CPU in float32 (a short context keeps it quick)."""
    from chat.export import export

    return export(str(demo_gguf), tmp_path_factory.mktemp("gguf") / "artifact", dtype="float32", max_len=256)


# ---- the demo GGUF ----


@pytest.mark.demo
@pytest.mark.slow
def test_gguf_answers_on_transformers(demo_gguf, tmp_path):
    # A file of the same name in the working directory must not be the one loaded.
    write_gguf(tmp_path / demo_gguf.name, "mamba2")
    result = chat(str(demo_gguf), "--backend", "transformers", "--temperature", "0", "--prompt", QUESTION, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert len(result.stdout.split()) < 15, "the reply should stop at the GGUF's eos, <|im_end|>"


@pytest.mark.demo
def test_gguf_is_a_model(demo_gguf):
    assert is_gguf(demo_gguf)
    assert locate_model(LoadOptions(model=str(demo_gguf))) == demo_gguf.resolve()
    assert check_gguf(demo_gguf) == "llama"
    assert model_recommendations(demo_gguf) == {}  # a file, not a directory with a generation_config.json


@pytest.mark.demo
@pytest.mark.slow
def test_exported_gguf_answers_on_torchscript(gguf_artifact):
    manifest = json.loads((gguf_artifact / "chat-artifact.json").read_text())
    assert manifest["source"]["sha256"] == DEMO_GGUF_SHA256
    assert manifest["source"]["path"] == str(DEMO_GGUF.resolve())
    assert manifest["eos_token_ids"] == [2] and manifest["architecture"] == "llama"
    config = json.loads((gguf_artifact / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (gguf_artifact / "chat_template.jinja").is_file()
    result = chat(str(gguf_artifact), "--backend", "torchscript", "--temperature", "0", "--prompt", QUESTION)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.demo
def test_fetch_keeps_the_gguf_file():
    """A second run of the fetch script finds both the model directory and the GGUF file, and changes nothing."""
    if not (REPO / "models" / "smollm2-135m-instruct" / ".complete").is_file():
        pytest.skip("demo model not fetched: run `make demo-model`")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fetch_demo_model.py")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("already there") == 2, result.stderr
    assert hashlib.sha256(DEMO_GGUF.read_bytes()).hexdigest() == DEMO_GGUF_SHA256


# ---- files that are not GGUF, or cannot run ----


def test_a_gguf_name_that_is_not_gguf_is_one_line(tmp_path):
    fake = tmp_path / "x.gguf"
    fake.write_text("not a model\n")
    result = chat("--model", str(fake), "--prompt", "hi")
    assert result.returncode == 2 and "is not a GGUF file" in result.stderr and one_line(result.stderr), result.stderr


def test_what_is_a_gguf_file(tmp_path):
    assert is_gguf(write_gguf(tmp_path / "tiny.bin", "llama"))  # by its first bytes, whatever its name
    assert not is_gguf(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"GGU")
    assert not is_gguf(tmp_path / "weights.bin")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(UsageError, match="is not a GGUF file"):
        is_gguf(tmp_path / "empty.gguf")
    with pytest.raises(UsageError, match="is a file; name the model's directory"):
        locate_model(LoadOptions(model=str(tmp_path / "weights.bin")))
    with pytest.raises(UsageError, match=r"GGUF file .* does not exist"):
        locate_model(LoadOptions(model=str(tmp_path / "missing.gguf")))


def test_unsupported_architecture_is_one_line(tmp_path):
    model = write_gguf(tmp_path / "tiny.gguf", "mamba2")
    result = chat(str(model), "--backend", "transformers", "--prompt", "hi")
    assert result.returncode == 1 and one_line(result.stderr), result.stderr
    assert "'mamba2'" in result.stderr and "transformers" in result.stderr and "cannot read" in result.stderr


def test_export_names_an_architecture_it_cannot_export(tmp_path):
    from chat.export import export

    with pytest.raises(ChatError, match=r"'mamba2' model, which transformers .* cannot read"):
        export(str(write_gguf(tmp_path / "mamba2.gguf", "mamba2")), tmp_path / "out")
    # stablelm: transformers reads it, the exporter does not (the check comes before any weight is read).
    with pytest.raises(ChatError, match="exporting 'stablelm' models to TorchScript is not supported"):
        export(str(write_gguf(tmp_path / "stablelm.gguf", "stablelm")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_both_readers_find_the_architecture(tmp_path):
    model = write_gguf(tmp_path / "tiny.gguf", "qwen2")
    assert gguf_architecture(model) == gguf_package_architecture(model) == "qwen2"


def test_a_damaged_gguf_is_one_line(tmp_path):
    model = write_gguf(tmp_path / "tiny.gguf", "llama")
    model.write_bytes(model.read_bytes()[:40])
    with pytest.raises(ChatError, match="could not be read as GGUF") as raised:
        check_gguf(model)
    assert one_line(str(raised.value))


def test_without_the_gguf_package_says_what_to_install(tmp_path, monkeypatch):
    model = write_gguf(tmp_path / "tiny.gguf", "llama")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed: find_spec and import both fail
    with pytest.raises(ChatError, match=r"pip install gguf$"):
        check_gguf(model)


def test_the_demo_gguf_runs_native_from_its_first_chat(demo_gguf, tmp_path):
    """`chat FILE.gguf` as a user types it: exported on first use (auto), then answered on TorchScript."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CHAT_ARTIFACTS_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "chat", str(demo_gguf), "--temperature", "0", "--no-autosave"]
    first = subprocess.run(command, input=QUESTION + "\n!status\n", capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert "Paris" in first.stdout and "made in" in first.stderr, first.stdout + first.stderr
    assert "torchscript (auto: exported on first use, cached in" in first.stdout
