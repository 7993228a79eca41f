"""Nothing a user does loses their chat: the real `chat` met with Ctrl+C on every kernel path, closed
windows, two terminals, full disks, files that are not chats, and flags against a loaded file."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import sys

import pexpect
import pytest
from helpers import make_session, output
from test_cli import run_chat
from test_terminal import PROMPT, quit_with_eof, saved, spawn

from chat.commands import handle

LONG_REPLY = ("--temperature", "0", "--max-new-tokens", "400", "--min-new-tokens", "400")


def kept_chats(tmp_path) -> list:
    return sorted((tmp_path / "data" / "chat" / "sessions").glob("chat-*.json"))


def messages(path) -> list[dict]:
    return json.loads(path.read_text())["messages"]


@pytest.mark.demo
@pytest.mark.parametrize("path", ["native kernels", "fallback ops", "transformers"])
def test_streaming_and_ctrl_c_mid_reply_keep_the_partial_reply_on_every_path(demo_model, tmp_path, monkeypatch, path):
    """On torch's fallback ops (a Python op inside TorchScript), Ctrl+C once came out as a RuntimeError."""
    if path != "native kernels":  # no library, and a compiler that fails: torch's ops behind chat's
        monkeypatch.setenv("CHAT_NATIVE_DIR", str(tmp_path / "empty"))
        monkeypatch.setenv("CXX", "/bin/false")
    backend = ("--backend", "transformers") if path == "transformers" else ()
    child = spawn(demo_model, *LONG_REPLY, *backend, tmp_path=tmp_path)
    child.sendline("Write a long story about a lighthouse keeper.")
    child.expect_exact("smollm2-135m-instruct: ")
    # Streaming: words arrive while the reply is still being written (400 tokens take many seconds).
    child.expect(r"\w+ \w+ \w+")
    child.sendintr()
    child.expect_exact("(interrupted; the partial reply is kept)", timeout=5)
    child.expect_exact(PROMPT)
    assert "failed" not in child.before and "Traceback" not in child.before
    data = saved(child, tmp_path / "i.json")
    question, reply = data["messages"]
    assert question["content"].startswith("Write a long story") and reply.get("interrupted") is True
    assert reply["content"]
    child.sendline("!status")
    child.expect_exact("last reply")
    child.expect_exact(PROMPT)
    quit_with_eof(child)


@pytest.mark.demo
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_closing_the_window_mid_reply_keeps_the_question_and_the_partial_reply(demo_model, tmp_path, signum):
    child = spawn(demo_model, *LONG_REPLY, tmp_path=tmp_path)
    child.sendline("Write a long story about a lighthouse keeper.")
    child.expect_exact("smollm2-135m-instruct: ")
    (path,) = kept_chats(tmp_path)
    assert [m["role"] for m in messages(path)] == ["user"]  # on disk before the reply
    child.expect(r"\w+ \w+ \w+")
    child.kill(signum)
    child.expect(pexpect.EOF, timeout=10)  # the terminal is let go before the chat is written: wait for the end
    child.wait()  # (close() would send it SIGINT too)
    assert child.exitstatus == 128 + signum
    question, reply = messages(path)
    assert question["content"].startswith("Write a long story")
    assert reply["role"] == "assistant" and reply["content"] and reply["interrupted"] is True


def test_closing_the_window_at_the_prompt_leaves_the_chat_on_disk(tiny_llama, tmp_path):
    child = spawn(tiny_llama, "--max-new-tokens", "3", tmp_path=tmp_path)
    child.sendline("Hello")
    child.expect_exact(PROMPT)
    child.kill(signal.SIGHUP)
    child.expect(pexpect.EOF, timeout=10)  # the terminal is let go before the chat is written: wait for the end
    child.wait()  # (close() would send it SIGINT too)
    assert child.exitstatus == 128 + signal.SIGHUP
    (path,) = kept_chats(tmp_path)
    assert [m["role"] for m in messages(path)] == ["user", "assistant"]


def test_undo_of_the_only_exchange_leaves_nothing_for_continue(tiny_llama, tmp_path):
    child = spawn(tiny_llama, "--max-new-tokens", "3", tmp_path=tmp_path)
    child.sendline("Forget I said this")
    child.expect_exact(PROMPT)
    assert len(kept_chats(tmp_path)) == 1
    child.sendline("!undo")
    child.expect_exact("removed the last exchange")
    child.expect_exact(PROMPT)
    quit_with_eof(child)
    assert kept_chats(tmp_path) == [] and "kept in" not in child.before


def test_two_terminals_on_one_chat_lose_no_turn(tiny_llama, tmp_path):
    first = spawn(tiny_llama, "--max-new-tokens", "3", tmp_path=tmp_path)
    first.sendline("one")
    first.expect_exact(PROMPT)
    quit_with_eof(first)
    (path,) = kept_chats(tmp_path)
    left = spawn(tiny_llama, "--max-new-tokens", "3", "--continue", tmp_path=tmp_path)
    right = spawn(tiny_llama, "--max-new-tokens", "3", "--continue", tmp_path=tmp_path)
    for child in (left, right):  # both have read the chat (it loads behind the prompt)
        child.sendline("!status")
        child.expect_exact(f"kept in     {path}")
        child.expect_exact(PROMPT)
    left.sendline("from the left")
    left.expect_exact(PROMPT)
    right.sendline("from the right")
    right.expect_exact("was changed by another chat; this one goes on in ")
    right.expect_exact(PROMPT)
    quit_with_eof(left)
    quit_with_eof(right)
    forked = [p for p in kept_chats(tmp_path) if p != path]
    assert len(forked) == 1
    users = {p: [m["content"] for m in messages(p) if m["role"] == "user"] for p in (path, forked[0])}
    assert users == {path: ["one", "from the left"], forked[0]: ["one", "from the right"]}


def test_a_full_disk_is_said_once_and_leaving_says_the_chat_is_not_on_disk(tiny_llama, tmp_path):
    """A file size limit (as a full disk does) fails each write after the first small one."""

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))  # the question fits, not its reply

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "NO_COLOR": "1",
    }
    argv = ["-m", "chat", str(tiny_llama), "--max-new-tokens", "60", "--min-new-tokens", "60"]
    child = pexpect.spawn(
        sys.executable, argv, env=env, encoding="utf-8", timeout=120, dimensions=(40, 200), preexec_fn=limit_file_size
    )
    child.expect_exact(PROMPT)
    child.sendline("Hello")
    child.expect_exact("this chat is not on disk: chat tries again after the next change")
    child.expect_exact(PROMPT)
    child.sendline("Again")
    child.expect_exact(PROMPT)
    assert "not on disk" not in child.before  # said once
    child.sendeof()
    child.expect_exact("the chat's last changes are not on disk")
    child.expect_exact("!save PATH saves them, and Ctrl+D (or !exit) again leaves without")
    child.expect_exact(PROMPT)
    quit_with_eof(child)
    assert "kept in" not in child.before


def test_an_unwritable_save_dir_is_said_at_start(tiny_llama, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    child = spawn(tiny_llama, "--save-dir", str(blocked / "sessions"), tmp_path=tmp_path)
    assert "this chat is not kept on disk" in child.before and str(blocked) in child.before
    quit_with_eof(child)


def test_save_never_replaces_a_file_that_is_not_a_chat(tiny_llama, tmp_path):
    session = make_session(tiny_llama, "--max-new-tokens", "2")
    session.ask("Hello")
    notes = tmp_path / "notes.md"
    notes.write_text("my notes")
    notes.chmod(0o644)
    link = tmp_path / "link.json"
    link.symlink_to(notes)
    output(session)
    for target in (notes, link):
        handle(session, f"!save {target}")
        assert f"exists and is not a chat saved by chat; !save! {notes} replaces it" in output(session)[1]
    assert notes.read_text() == "my notes" and stat.S_IMODE(notes.stat().st_mode) == 0o644
    chat_file = tmp_path / "kept.json"
    handle(session, f"!save {chat_file}")
    chat_file.chmod(0o640)
    session.ask("Again")
    handle(session, f"!save {chat_file}")  # a chat file: replaced, its mode kept
    assert stat.S_IMODE(chat_file.stat().st_mode) == 0o640 and len(messages(chat_file)) == 4
    handle(session, f"!save! {link}")
    assert link.is_symlink() and len(messages(notes)) == 4
    assert "saved 4 message(s)" in output(session)[0]


def test_flags_win_over_a_loaded_file_and_status_says_where_each_came_from(tiny_llama, tmp_path):
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps(
            {
                "parameters": {"max_new_tokens": 256, "temperature": 0.1, "top_k": 7},
                "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            }
        )
    )
    result = run_chat(str(tiny_llama), "--load", str(path), "--max-new-tokens", "7", stdin="!set top_k=3\n!status\n")
    assert result.returncode == 0, result.stderr
    assert "max_new_tokens=7 (command line)" in result.stdout and "temperature=0.1 (loaded chat)" in result.stdout
    assert "top_k=3 (!set)" in result.stdout


def test_a_refused_piped_message_exits_non_zero(tiny_llama):
    result = run_chat(str(tiny_llama), "--max-new-tokens", "2", stdin="word " * 400 + "\n")
    assert result.returncode == 1 and "shorten it" in result.stderr and "Traceback" not in result.stderr


def test_system_none_removes_the_system_prompt_and_two_bangs_send_a_message(tiny_llama):
    session = make_session(tiny_llama, "--system", "Be brief.", "--max-new-tokens", "2")
    handle(session, "!system none")
    assert session.conversation.system is None and "system prompt removed" in output(session)[0]
    assert handle(session, "!!important: read this")
    assert session.conversation.messages[0] == {"role": "user", "content": "!important: read this"}
    handle(session, "!help")
    assert "!!text sends a message that starts with !" in output(session)[0]
