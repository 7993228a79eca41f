"""The command line: parsing, every validation, and the one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from chat.cli import main, parse_args
from chat.errors import UsageError


def run_chat(*args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chat", *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


def test_help_and_version_do_not_import_torch():
    for flag in ("--help", "--version"):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "chat", flag], capture_output=True, text=True, check=True
        )
        imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()}
        assert "torch" not in imported and "transformers" not in imported
        assert result.stdout.startswith("chat ")


def test_help_is_quick():
    started = time.perf_counter()
    assert run_chat("--help").returncode == 0
    # Generous bound: this guards against importing torch (seconds), not a speed claim.
    assert time.perf_counter() - started < 3


def test_model_name_forms(tiny_llama):
    assert parse_args([str(tiny_llama)]).model == str(tiny_llama)
    assert parse_args(["--model", str(tiny_llama)]).model == str(tiny_llama)
    assert parse_args([f"--model_name_or_path={tiny_llama}"]).model == str(tiny_llama)
    with pytest.raises(UsageError, match="two different models"):
        parse_args([str(tiny_llama), "--model", "gpt2"])


def test_options_parsed(tiny_llama, tmp_path):
    options = parse_args(
        [
            str(tiny_llama),
            "--temperature",
            "0",
            "--top-k",
            "5",
            "--top-p",
            "0.5",
            "--repetition-penalty",
            "1.2",
            "--max-new-tokens",
            "9",
            "--min-new-tokens",
            "2",
            "--seed",
            "7",
            "--system",
            "Be kind",
            "--user",
            "Ana",
            "--no-stream",
            "--context-policy",
            "error",
            "--save-dir",
            str(tmp_path),
            "--backend",
            "transformers",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--threads",
            "3",
            "--offline",
            "--trust-remote-code",
        ]
    )
    assert options.param_changes == {
        "temperature": 0.0,
        "top_k": 5,
        "top_p": 0.5,
        "repetition_penalty": 1.2,
        "max_new_tokens": 9,
        "min_new_tokens": 2,
        "seed": 7,
    }
    assert options.system == "Be kind" and options.user == "Ana" and not options.stream
    assert options.context_policy == "error" and options.save_dir == tmp_path
    assert options.backend == "transformers" and options.device == "cpu" and options.dtype == "float32"
    assert options.offline and options.trust_remote_code and options.threads == 3
    assert parse_args([str(tiny_llama)]).threads is None


BAD = [
    (["--temperature", "hot"], "--temperature must be a number"),
    (["--temperature", "-1"], "--temperature must be"),
    (["--top-p", "0"], "--top-p must be"),
    (["--top-p", "1.5"], "--top-p must be"),
    (["--top-k", "-3"], "--top-k must be"),
    (["--top-k", "2.5"], "--top-k must be a whole number"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be"),
    (["--min-new-tokens", "-1"], "--min-new-tokens must be"),
    (["--min-new-tokens", "10", "--max-new-tokens", "5"], "min_new_tokens (10) is above max_new_tokens (5)"),
    (["--seed", "x"], "--seed must be"),
    (["--backend", "onnx"], "--backend must be one of auto, torchscript, transformers"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--quantize", "int2"], "--quantize must be one of auto, int8, int4, none"),
    (["--quantize", "int4", "--device", "cuda"], "--quantize int4 is for the CPU"),
    (["--quantize", "int4", "--dtype", "float32"], "--quantize int4 runs bfloat16 activations"),
    (["--threads", "0"], "--threads must be a whole number from 1 to 4096, not '0'"),
    (["--threads", "two"], "--threads must be a whole number from 1 to 4096, not 'two'"),
    (["--context-policy", "shrug"], "--context-policy must be one of drop-oldest, error"),
    (["--user", "a:b"], "--user must be a short label"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--model", ""], "--model is empty; name a model directory or Hub id"),
    (["--save-dir", ""], "--save-dir is empty"),
    (["--load", ""], "--load is empty"),
    (["--load", "/no/such/file.json"], "--load: no file"),
    (["--temprature", "1"], "unknown option --temprature; did you mean --temperature?"),
    (["--top-k", "5", "--top-k", "7"], "--top-k is given twice; give it once"),
    (["--prompt", "two words", "extra", "more"], "one MODEL at most"),
]


def test_continue_picks_the_chat_kept_last_and_keeps_it_there(tiny_llama, tmp_path, capsys):
    older, newer = tmp_path / "chat-20260101-000000.json", tmp_path / "chat-20250101-000000.json"
    for path, when in ((older, 1_000_000), (newer, 2_000_000)):  # by time written, not by name
        path.write_text('{"messages": []}')
        os.utime(path, (when, when))
    options = parse_args([str(tiny_llama), "--save-dir", str(tmp_path), "--continue"])
    assert options.load == newer and options.keep_in == newer
    assert parse_args([str(tiny_llama), "--save-dir", str(tmp_path), "--continue", "--no-autosave"]).keep_in is None
    fresh = parse_args([str(tiny_llama), "--save-dir", str(tmp_path)])
    assert fresh.keep_in.parent == tmp_path and fresh.keep_in.name.startswith("chat-") and fresh.load is None
    assert main([str(tiny_llama), "--save-dir", str(tmp_path / "none"), "--continue"]) == 2
    assert "--continue: no chat kept in" in capsys.readouterr().err
    assert main([str(tiny_llama), "--save-dir", str(tmp_path), "--continue", "--load", str(older)]) == 2
    assert "--continue and --load both name a chat to resume; give one" in capsys.readouterr().err


def test_one_shot_keeps_nothing_unless_it_continues_a_kept_chat(tiny_llama, tmp_path):
    saves = tmp_path / "sessions"
    args = (str(tiny_llama), "--save-dir", str(saves), "--max-new-tokens", "2", "--backend", "transformers")
    assert run_chat(*args, "--prompt", "hi").returncode == 0 and not saves.exists()
    saves.mkdir()
    kept = saves / "chat-20260101-000000.json"
    kept.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    assert run_chat(*args, "--continue", "--prompt", "and then?").returncode == 0
    assert run_chat(*args, "--continue", stdin="more\n").returncode == 0
    said = [(m["role"], m["content"]) for m in json.loads(kept.read_text())["messages"]]
    assert said[:3] == [("user", "a"), ("assistant", "b"), ("user", "and then?")] and said[4] == ("user", "more")
    assert [role for role, _ in said] == ["user", "assistant"] * 3 and list(saves.iterdir()) == [kept]


def test_chats_lists_the_kept_chats_the_last_first_without_a_model_or_torch(tmp_path, capsys):
    def kept(name: str, when: int, text: str) -> None:
        (tmp_path / name).write_text(text)
        os.utime(tmp_path / name, (when, when))

    first = {"role": "user", "content": "What is\nthe capital of France?"}
    kept("chat-20260101-000000.json", 2_000_000, json.dumps({"messages": [first], "model": "models/smol"}))
    kept("chat-20270101-000000.json", 1_000_000, json.dumps({"messages": []}))
    kept("chat-20250101-000000.json", 3_000_000, "{ not json")
    (tmp_path / "notes.json").write_text("{}")  # not named as a kept chat
    assert main(["--chats", "--save-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"3 chat(s) kept in {tmp_path}, the last first (chat --load FILE goes on with one):"
    assert [line.split()[0] for line in lines[1:]] == [
        str(tmp_path / f"chat-{year}0101-000000.json") for year in (2025, 2026, 2027)
    ]
    assert lines[1].endswith(
        "(not a chat: not valid JSON: Expecting property name enclosed in double quotes at line 1 column 3)"
    )
    assert lines[2].endswith('1 messages  smol  "What is the capital of France?"') and lines[3].endswith(
        '0 messages  ""'
    )
    assert main(["--chats", "--save-dir", str(tmp_path / "none")]) == 0
    assert capsys.readouterr().out == f"no chats kept in {tmp_path / 'none'} yet\n"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "chat", "--chats", "--save-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "torch" not in {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()}


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_values_exit_2_with_one_line(args, message, tiny_llama, capsys):
    assert main([str(tiny_llama), *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_two_models_positional(capsys):
    assert main(["a", "b"]) == 2
    assert "one MODEL at most" in capsys.readouterr().err


def test_bad_value_subprocess_no_traceback(tiny_llama):
    result = run_chat(str(tiny_llama), "--top-k", "many")
    assert result.returncode == 2
    assert result.stderr.strip() == "chat: error: --top-k must be a whole number, not 'many'"


def test_verbose_adds_traceback(tmp_path):
    result = run_chat(str(tmp_path), "--verbose", "--backend", "transformers", "--prompt", "hi")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "has no config.json" in result.stderr.splitlines()[-1]


def test_no_model_and_no_demo(monkeypatch, capsys):
    monkeypatch.setattr("chat.cli.find_demo_model", lambda: None)
    assert main([]) == 2
    assert "make demo" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "has no config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"model_type": "llama"}'), "has no weights"),
    ],
)
def test_broken_model_dirs(tmp_path, setup, message):
    setup(tmp_path)
    result = run_chat(str(tmp_path), "--backend", "transformers", "--prompt", "hi")
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "config.json").write_text('{"model_type": "frobnicator"}'), "no causal LM for model type"),
        (lambda d: (d / "config.json").write_text("{}"), "names no model_type"),
        (lambda d: os.truncate(d / "model.safetensors", 5000), "they may be truncated"),
        (lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], "tokenizer"),
        (
            lambda d: (d / "config.json").write_text(
                '{"model_type": "custom-thing", "auto_map": {"AutoModelForCausalLM": "m.Model"}}'
            ),
            "--trust-remote-code",
        ),
    ],
)
def test_damaged_models(tiny_llama, tmp_path, damage, message):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    damage(model)
    result = run_chat(str(model), "--backend", "transformers", "--prompt", "hi")
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_missing_directory():
    result = run_chat("./no/such/model", "--prompt", "hi")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_a_file_named_as_the_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    result = run_chat(str(tmp_path / "weights.bin"), "--prompt", "hi")
    assert result.returncode == 2 and "is a file; name the model's directory" in result.stderr


def test_a_path_the_file_system_refuses_is_one_line(tiny_llama, tmp_path):
    too_long = "a/" * 3000  # over PATH_MAX: every stat of it fails with ENAMETOOLONG
    for args in (
        [too_long],
        [str(tiny_llama), "--load", too_long],
        [str(tiny_llama), "--save-dir", too_long, "--continue"],
    ):
        result = run_chat(*args, "--prompt", "hi")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("chat: error: File name too long: a/a/") and result.stderr.count("\n") == 1


def test_hub_out_of_reach_is_not_called_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    # Nothing listens on port 9 here: the download fails at once, as with no network.
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [sys.executable, "-m", "chat", "someone/some-model", "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "could not reach the Hugging Face Hub" in result.stderr and "offline" not in result.stderr


def test_offline_unknown_hub_id():
    result = run_chat("nobody-here/no-such-model", "--offline", "--backend", "transformers", "--prompt", "hi")
    assert result.returncode == 1
    assert "not in the local Hugging Face cache" in result.stderr and "Traceback" not in result.stderr
