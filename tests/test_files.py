"""Every file chat reads is read defensively: a damaged, hostile or foreign file is one line that names it and
says what is wrong, never a traceback; the rest (the session, the list of chats) goes on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_session, output

from chat.commands import handle
from chat.jsonfile import CHAT_MAX_BYTES, MAX_DEPTH, JSONFileError, MiB, read_json

DEEP = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"  # a RecursionError for a parser that recurses


def run_chat(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chat", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("chat: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert words in result.stderr, result.stderr


def test_a_deep_chat_named_by_load_or_continue_is_one_line(tiny_llama, tmp_path):
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    deep = sessions / "chat-20260101-000000.json"
    deep.write_text(DEEP)
    for how in (["--load", str(deep)], ["--continue"]):
        result = run_chat(str(tiny_llama), *how, "--save-dir", str(sessions), "--prompt", "hi")
        one_line_error(result, f"{deep} is nested too deeply for a saved chat session (over {MAX_DEPTH} levels)")


def test_chats_lists_every_kept_file_and_why_some_are_not_chats(tmp_path):
    (tmp_path / "chat-good.json").write_text(json.dumps({"messages": [{"role": "user", "content": "Hello"}]}))
    (tmp_path / "chat-deep.json").write_text(DEEP)
    (tmp_path / "chat-binary.json").write_bytes(bytes(range(128, 256)))
    (tmp_path / "chat-list.json").write_text("[1, 2]")
    (tmp_path / "chat-broken.json").write_text('{"messages": [}')
    with open(tmp_path / "chat-huge.json", "wb") as huge:  # sparse: no disk, no time, but over the limit
        huge.truncate(CHAT_MAX_BYTES + MiB)
    result = run_chat("--chats", "--save-dir", str(tmp_path))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = dict(line.split("  ", 1) for line in result.stdout.splitlines()[1:])
    reasons = {Path(path).stem.removeprefix("chat-"): rest.split("  ", 1)[1] for path, rest in lines.items()}
    assert reasons == {
        "huge": "(not a chat: too large, 257 MiB; the limit is 256 MiB)",
        "list": "(not a chat: its JSON is a list)",
        "binary": "(not a chat: not UTF-8 text)",
        "deep": "(not a chat: nested too deeply)",
        "broken": "(not a chat: not valid JSON: Expecting value at line 1 column 15)",
        "good": '1 messages  "Hello"',
    }


BAD_CHATS = {
    "nested too deeply": (DEEP, "is nested too deeply for a saved chat session"),
    "not UTF-8": (b"\x80\x81 not text", "is not UTF-8 text (a bad byte at offset 0)"),
    "interrupted not a bool": (
        '{"messages": [{"role": "assistant", "content": "x", "interrupted": "yes"}]}',
        "message 1: 'interrupted' must be true or false",
    ),
    "created not text": ('{"format": "chat-session", "messages": [], "created": 5}', "'created' must be text"),
    "context_start not a number": ('{"messages": [], "context_start": "0"}', "'context_start' must be a whole number"),
    "context_start past the messages": ('{"messages": [], "context_start": 3}', "from 0 to 0"),
    "version not a number": ('{"messages": [], "version": [1]}', "'version' must be a whole number"),
}


@pytest.mark.parametrize("case", BAD_CHATS)
def test_a_bad_chat_loaded_in_a_session_is_one_line_and_changes_nothing(tiny_llama, tmp_path, case):
    content, words = BAD_CHATS[case]
    path = tmp_path / "bad.json"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    session = make_session(tiny_llama, "--max-new-tokens", "2", "--save-dir", str(tmp_path))
    assert session.ask("Keep me")
    output(session)
    before = (list(session.conversation.messages), session.conversation.created, session.params)
    assert not handle(session, f"!load {path}")
    _, err = output(session)
    assert err.startswith("error: ") and str(path) in err and words in err, err
    assert err.endswith("; nothing was loaded\n")
    assert err.count("\n") == 1
    assert (session.conversation.messages, session.conversation.created, session.params) == before
    assert session.running and session.ask("Still here?")


def test_a_foreign_chat_may_say_when_it_was_made_in_its_own_way(tiny_llama, tmp_path):
    path = tmp_path / "other-tool.json"
    path.write_text('{"created": 1700000000, "messages": [{"role": "user", "content": "hi"}]}')
    session = make_session(tiny_llama)
    assert handle(session, f"!load {path}")
    assert isinstance(session.conversation.created, str) and len(session.conversation.messages) == 1


NESTED = "[" * 50_000  # unclosed: the parser meets the depth first


def test_a_damaged_model_file_is_one_line(tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "generation_config.json").write_text('{"do_sample": true, "temperature": ' + NESTED)
    one_line_error(
        run_chat(str(model), "--no-autosave", "--prompt", "hi"),
        "generation_config.json is nested too deeply for a generation config (over 100 levels); re-download",
    )
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "chat-artifact.json").write_text('{"format": "chat-torchscript-artifact", "shape": ' + NESTED)
    for backend, words in (
        ("auto", "chat-artifact.json is broken (nested too deeply); re-export it"),
        ("torchscript", "chat-artifact.json is broken (nested too deeply); re-export it"),
        ("transformers", "is a TorchScript artifact and its source checkpoint is not here"),
    ):
        one_line_error(run_chat(str(artifact), "--backend", backend, "--no-autosave", "--prompt", "hi"), words)


def test_a_damaged_artifact_in_a_model_directory_falls_back_in_one_line(tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    for dtype in ("float32", "bfloat16"):  # whichever auto takes on this CPU
        (model / "torchscript" / f"cpu-{dtype}").mkdir(parents=True)
        (model / "torchscript" / f"cpu-{dtype}" / "chat-artifact.json").write_text('{"a": ' + NESTED)
    result = run_chat(str(model), "--no-autosave", "--max-new-tokens", "3", "--prompt", "hi")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "is broken (nested too deeply)" in result.stderr
    assert f"running transformers on {model} instead" in result.stderr


def test_read_json_says_what_is_wrong(tmp_path):
    def problem(path: Path, max_bytes: int = MiB) -> str:
        with pytest.raises(JSONFileError) as error:
            read_json(path, "a test file", max_bytes)
        assert "\n" not in str(error.value)
        return str(error.value)

    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf{"ok": 1}')
    assert read_json(tmp_path / "bom.json", "a test file", MiB) == {"ok": 1}
    (tmp_path / "limit.json").write_text('{"a": ' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}")
    assert read_json(tmp_path / "limit.json", "a test file", MiB)  # as deep as allowed
    (tmp_path / "deeper.json").write_text('{"a": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}")
    assert problem(tmp_path / "deeper.json").endswith("is nested too deeply for a test file (over 100 levels)")
    (tmp_path / "strings.json").write_text(json.dumps({"a": ["[{" * 1000] * 3}))  # brackets in text do not nest
    assert read_json(tmp_path / "strings.json", "a test file", MiB)
    assert problem(tmp_path / "missing.json") == f"no file {tmp_path / 'missing.json'}"
    assert problem(tmp_path) == f"{tmp_path} is a directory, not a test file"
    os.mkfifo(tmp_path / "pipe.json")  # opening it would wait for a writer
    assert problem(tmp_path / "pipe.json").endswith("pipe.json is not a regular file (a pipe or a device, say)")
    assert problem(Path("/dev/zero")) == "/dev/zero is not a regular file (a pipe or a device, say)"
    (tmp_path / "big.json").write_text(" " * 2000 + "{}")
    assert problem(tmp_path / "big.json", 1000).endswith(
        "is too large for a test file (2,002 bytes; the limit is 1,000 bytes)"
    )
    (tmp_path / "bad.json").write_text('{"a": 1,}')
    assert problem(tmp_path / "bad.json").endswith(
        "is not valid JSON (Expecting property name enclosed in double quotes at line 1 column 9)"
    )
    (tmp_path / "digits.json").write_text('{"a": ' + "9" * 5000 + "}")
    assert problem(tmp_path / "digits.json").endswith("(a number of over 4300 digits)")
    (tmp_path / "null.json").write_text("null")
    assert problem(tmp_path / "null.json").endswith("is not a test file: its JSON is null, not an object")
    assert "cannot name a file: it holds a NUL character" in problem(tmp_path / "a\0b")
