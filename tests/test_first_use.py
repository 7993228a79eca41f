"""Export on first use: a plain model directory runs on TorchScript from its first `chat`, through chat's cache,
and whatever keeps the export from happening is one line before the chat goes on with transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from conftest import build_model

from chat import auto_export
from chat.artifact_cache import Target, entry_for

QUESTION = ("--temperature", "0", "--max-new-tokens", "4", "--no-autosave")


def run_chat(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chat", *args],
        input="!status\n",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "CHAT_ARTIFACTS_DIR": str(cache), **env},
    )


def backend_line(result: subprocess.CompletedProcess) -> str:
    """The backend !status reports."""
    assert result.returncode == 0, result.stderr
    return next(line for line in result.stdout.splitlines() if line.startswith("backend"))


@pytest.fixture
def model(tiny_llama, tmp_path) -> Path:
    """A copy of the tiny llama of this test's own, so that its cache entries are too."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "tiny"))


def cached(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else []


def test_a_plain_model_runs_native_from_its_first_chat_and_the_second_reuses_the_artifact(model, tmp_path):
    cache = tmp_path / "cache"
    first = run_chat(str(model), *QUESTION, cache=cache)
    assert "torchscript (auto: exported on first use, cached in" in backend_line(first)
    assert "making a native artifact of tiny for cpu-" in first.stderr and "made in" in first.stderr
    [entry] = cached(cache)
    second = run_chat(str(model), *QUESTION, cache=cache)
    assert "exported on first use" in backend_line(second)
    assert "making" not in second.stderr, second.stderr
    assert cached(cache) == [entry]

    listing = subprocess.run(
        [sys.executable, "-m", "chat", "--cache"],
        capture_output=True,
        text=True,
        env={**os.environ, "CHAT_ARTIFACTS_DIR": str(cache)},
    )
    assert entry in listing.stdout and "KiB" in listing.stdout and str(model) in listing.stdout
    removed = subprocess.run(
        [sys.executable, "-m", "chat", "--cache-remove", entry],
        capture_output=True,
        text=True,
        env={**os.environ, "CHAT_ARTIFACTS_DIR": str(cache)},
    )
    assert removed.returncode == 0 and "removed 1 entry" in removed.stdout
    assert cached(cache) == []


def test_no_export_and_backend_transformers_opt_out(model, tmp_path):
    cache = tmp_path / "cache"
    for how in (["--no-export"], ["--backend", "transformers"]):
        result = run_chat(str(model), *QUESTION, *how, cache=cache)
        assert "transformers" in backend_line(result) and "making" not in result.stderr
    assert cached(cache) == []
    run_chat(str(model), *QUESTION, cache=cache)  # exported; --no-export leaves it alone too
    assert "transformers" in backend_line(run_chat(str(model), *QUESTION, "--no-export", cache=cache))


def test_quantize_picks_the_weights_and_each_choice_has_its_own_entry(model, tmp_path):
    cache = tmp_path / "cache"
    full = run_chat(str(model), *QUESTION, "--quantize", "none", "--dtype", "float32", cache=cache)
    assert "cpu-float32-" in backend_line(full) and "int8" not in backend_line(full)
    rounded = run_chat(str(model), *QUESTION, "--quantize", "int8", "--dtype", "float32", cache=cache)
    assert "cpu-float32-int8-" in backend_line(rounded)
    named = run_chat(str(model), *QUESTION, "--dtype", "bfloat16", cache=cache)  # a dtype asked for: unrounded
    assert "cpu-bfloat16-" in backend_line(named) and "int8" not in backend_line(named)
    smallest = run_chat(str(model), *QUESTION, "--quantize", "int4", cache=cache)
    assert "cpu-bfloat16-int4-" in backend_line(smallest)
    assert "int4 weights" in next(line for line in smallest.stdout.splitlines() if line.startswith("device"))
    assert len(cached(cache)) == 4


def test_a_changed_model_is_exported_again_and_replaces_its_old_entry(model, tmp_path):
    cache = tmp_path / "cache"
    run_chat(str(model), *QUESTION, cache=cache)
    [old] = cached(cache)
    config = model / "config.json"
    os.utime(config, ns=(time.time_ns(), time.time_ns() + 10**9))
    again = run_chat(str(model), *QUESTION, cache=cache)
    assert "made in" in again.stderr and "replaced 1 older one" in again.stderr
    [new] = cached(cache)
    assert new != old


def test_an_unsupported_family_is_one_line_and_runs_on_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    directory = tmp_path / "neox"
    build_model(directory, "gpt2")  # its tokenizer; the weights are replaced by a GPT-NeoX model's
    for weights in directory.glob("*.safetensors"):
        weights.unlink()
    config = GPTNeoXConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    result = run_chat(str(directory), *QUESTION, cache=tmp_path / "cache")
    assert "transformers" in backend_line(result)
    assert "(gpt_neox models do not run on chat's native core yet: running on transformers)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_failed_export_is_one_line_remembered_and_retried_after_cache_remove(model, tmp_path):
    cache = tmp_path / "cache"
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))  # the exporter lacks it
    first = run_chat(str(model), *QUESTION, cache=cache)
    assert "transformers" in backend_line(first)
    assert "(could not export: " in first.stderr and "running on transformers)" in first.stderr
    assert "Traceback" not in first.stderr
    [failed] = [p for p in cache.iterdir() if p.name.endswith(".failed")]
    second = run_chat(str(model), *QUESTION, cache=cache)
    assert "it failed before" in second.stderr and "making" not in second.stderr
    name = failed.name.removesuffix(".failed")
    env = {**os.environ, "CHAT_ARTIFACTS_DIR": str(cache)}
    listed = subprocess.run([sys.executable, "-m", "chat", "--cache"], capture_output=True, text=True, env=env)
    assert f"{name}  export failed:" in listed.stdout
    subprocess.run([sys.executable, "-m", "chat", "--cache-remove", name], check=True, capture_output=True, env=env)
    third = run_chat(str(model), *QUESTION, cache=cache)
    assert "making a native artifact" in third.stderr


def test_a_cache_that_cannot_be_written_is_one_line(model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_chat(str(model), *QUESTION, cache=blocker / "cache")
    assert "transformers" in backend_line(result)
    [line] = [line for line in result.stderr.splitlines() if "not exported" in line]
    assert f"the artifact cache {blocker / 'cache'} cannot be written" in line and "CHAT_ARTIFACTS_DIR" in line


def test_too_little_disk_or_memory_is_said_before_exporting(model, tmp_path, monkeypatch):
    entry = entry_for(model, Target("cpu", "float32"))
    monkeypatch.setenv("CHAT_ARTIFACTS_DIR", str(tmp_path / "cache"))
    assert auto_export._room_problem(entry, model, Target("cpu", "float32")) is None

    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(auto_export.os, "statvfs", lambda path: Full)
    assert "GiB needed in" in auto_export._room_problem(entry, model, Target("cpu", "float32"))
    monkeypatch.undo()
    monkeypatch.setattr(auto_export, "_available_memory", lambda: 1 << 20)
    assert "the export needs about" in auto_export._room_problem(entry, model, Target("cpu", "float32"))


def test_two_chats_exporting_one_model_at_once_make_one_artifact(model, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CHAT_ARTIFACTS_DIR": str(cache)}
    command = [sys.executable, "-m", "chat", str(model), *QUESTION]
    both = [
        subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    results = [p.communicate("!status\n", timeout=300) for p in both]
    for process, (out, err) in zip(both, results, strict=True):
        assert process.returncode == 0, err
        assert "exported on first use" in out
    assert sum("made in" in err for _, err in results) == 1, results
    assert len(cached(cache)) == 1


def test_ctrl_c_during_the_export_keeps_nothing_and_the_chat_runs_on_transformers(model, tmp_path):
    cache = tmp_path / "cache"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "CHAT_ARTIFACTS_DIR": str(cache),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "NO_COLOR": "1",
        "TERM": "xterm",
    }
    child = pexpect.spawn(sys.executable, ["-m", "chat", str(model)], env=env, encoding="utf-8", timeout=120)
    child.expect("making a native artifact")
    child.expect(r"\[ *\d+\.\ds\] ")  # the exporter is under way
    child.sendintr()
    child.expect("stopped: nothing was kept; running on transformers this time")
    child.expect("User: ")
    child.sendline("!status")
    child.expect("backend +transformers")
    child.sendeof()
    child.expect(pexpect.EOF)
    assert cached(cache) == []
    leftovers = [p for p in cache.iterdir() if p.name.startswith(".") and p.name != ".locks"]
    assert leftovers == []


def test_cache_commands_need_no_model_and_say_what_is_wrong_in_one_line(tmp_path):
    env = {**os.environ, "CHAT_ARTIFACTS_DIR": str(tmp_path / "cache")}
    empty = subprocess.run([sys.executable, "-m", "chat", "--cache"], capture_output=True, text=True, env=env)
    assert empty.returncode == 0 and empty.stdout == f"no artifacts cached in {tmp_path / 'cache'}\n"
    for name, words in (("nope", "no such entry in"), ("../x", "give a name as chat --cache lists it")):
        wrong = subprocess.run(
            [sys.executable, "-m", "chat", "--cache-remove", name], capture_output=True, text=True, env=env
        )
        assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and words in wrong.stderr, wrong.stderr
