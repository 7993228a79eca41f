"""End to end: the real `chat` in a pseudo-terminal (pexpect) and behind a pipe."""

from __future__ import annotations

import io
import json
import os
import random
import re
import shlex
import subprocess
import sys

import pexpect
import pytest
from helpers import make_session

from chat.screen import Screen, WordWrap, char_width, printable

PROMPT = "User: "


def spawn(model, *args: str, tmp_path, color: bool = False, then: str | None = None) -> pexpect.spawn:
    """`chat model args` in a pseudo-terminal, at its first prompt; `then`: a shell command run after it."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_DATA_HOME": str(tmp_path / "data"),  # where chats are kept
        "TERM": "xterm",
    }
    if not color:
        env["NO_COLOR"] = "1"
    command, argv = sys.executable, ["-m", "chat", str(model), *args]
    if then is not None:
        command, argv = "/bin/sh", ["-c", " ".join(shlex.quote(a) for a in [command, *argv]) + f"; {then}"]
    child = pexpect.spawn(
        command,
        argv,
        env=env,
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )
    child.expect(r"User:(\x1b\[0m)? ")  # coloured or not
    return child


def saved(child: pexpect.spawn, path) -> dict:
    child.sendline(f"!save {path}")
    child.expect_exact("saved")
    child.expect_exact(PROMPT)
    return json.loads(path.read_text())


def quit_with_eof(child: pexpect.spawn) -> None:
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_set_save_load_and_eof(tiny_llama, tmp_path):
    child = spawn(tiny_llama, "--max-new-tokens", "5", "--temperature", "1", "--seed", "1", tmp_path=tmp_path)
    child.sendline("Hello there")
    child.expect_exact("tiny-llama0: ")
    child.expect_exact(PROMPT)
    child.sendline("!set temperature=0.2 top_k=3")
    child.expect_exact("temperature=0.2 top_k=3")
    child.expect_exact(PROMPT)
    child.sendline("!set temperature=boiling")
    child.expect_exact("temperature must be a number")
    child.expect_exact(PROMPT)
    data = saved(child, tmp_path / "s.json")
    assert data["parameters"]["temperature"] == 0.2 and data["messages"][0]["content"] == "Hello there"
    child.sendline("!clear")
    child.expect_exact("history cleared")
    child.sendline(f"!load {tmp_path / 's.json'}")
    child.expect_exact("loaded 2 message(s)")
    child.expect_exact(PROMPT)
    child.sendline("!status")
    child.expect_exact("temperature=0.2")
    child.expect_exact(PROMPT)
    quit_with_eof(child)
    assert (tmp_path / "state" / "chat" / "history").read_text().count("Hello there") == 1


def test_edit_sends_what_the_editor_saved_and_survives_a_failing_editor(tiny_llama, tmp_path, monkeypatch):
    editor = tmp_path / "editor"  # a real program in the editor's place: it words the text it was given
    editor.write_text(
        f'#!/bin/sh\nstty -a > {tmp_path / "stty"}\nprintf "Tell me about %s\\nin two lines" "$(cat "$1")" > "$1"\n'
    )
    editor.chmod(0o755)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.delenv("VISUAL", raising=False)

    def edit(command: str, *replies: str) -> pexpect.spawn:
        monkeypatch.setenv("EDITOR", command)
        child = spawn(tiny_llama, "--max-new-tokens", "3", tmp_path=tmp_path)
        child.sendline("!edit cats")
        for reply in replies:
            child.expect_exact(reply)
        child.expect_exact(PROMPT)
        return child

    child = edit(str(editor), "Tell me about cats", "tiny-llama0: ")
    data = saved(child, tmp_path / "s.json")
    assert data["messages"][0] == {"role": "user", "content": "Tell me about cats\nin two lines"}
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert " icanon " in (tmp_path / "stty").read_text() and " echo " in (tmp_path / "stty").read_text()
    quit_with_eof(child)
    quit_with_eof(edit("false", "the editor `false` exited with status 1; nothing was sent"))
    quit_with_eof(edit("no-such-editor --wait", "no editor `no-such-editor` here; set $EDITOR to one you have"))
    quit_with_eof(edit("sh -c ': > $0'", "nothing sent (the message was left empty)"))
    quit_with_eof(edit("vim '", "cannot read the editor command `vim '` (No closing quotation); fix $EDITOR"))
    quit_with_eof(edit(str(tmp_path / "stty"), f"could not run the editor `{tmp_path / 'stty'}` (Permission denied)"))
    assert not list((tmp_path / "tmp").iterdir())  # the message's file is gone


def test_a_chat_is_kept_as_it_goes_and_continue_resumes_it(tiny_llama, tmp_path):
    sessions = tmp_path / "data" / "chat" / "sessions"
    child = spawn(tiny_llama, "--max-new-tokens", "3", tmp_path=tmp_path)
    child.sendline("Hello")
    child.expect_exact("tiny-llama0: ")
    child.expect_exact(PROMPT)
    kept = list(sessions.glob("chat-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["messages"][0]["content"] == "Hello"  # before leaving
    child.sendeof()
    child.expect_exact(f"(kept in {kept[0]}; chat --continue resumes it)")
    child.expect(pexpect.EOF)
    child = spawn(tiny_llama, "--max-new-tokens", "3", "--continue", tmp_path=tmp_path)
    assert f"(resuming the chat in {kept[0]})" in child.before
    child.sendline("Again")
    child.expect_exact("tiny-llama0: ")
    child.expect_exact(PROMPT)
    quit_with_eof(child)
    users = [m["content"] for m in json.loads(kept[0].read_text())["messages"] if m["role"] == "user"]
    assert users == ["Hello", "Again"] and list(sessions.glob("chat-*.json")) == kept
    child = spawn(tiny_llama, "--max-new-tokens", "3", "--no-autosave", tmp_path=tmp_path)
    child.sendline("Not kept")
    child.expect_exact(PROMPT)
    quit_with_eof(child)
    assert "kept in" not in child.before and list(sessions.glob("chat-*.json")) == kept


def test_multiline_block_and_bracketed_paste(tiny_llama, tmp_path):
    child = spawn(tiny_llama, "--max-new-tokens", "3", tmp_path=tmp_path)
    child.sendline('"""')
    child.expect_exact("... ")
    child.sendline("line one")
    child.sendline("line two")
    child.sendline('"""')
    child.expect_exact(PROMPT)
    # A paste with line breaks, as a terminal sends it with bracketed paste on: one message.
    child.send("\x1b[200~pasted one\npasted two\x1b[201~")
    child.sendline("")
    child.expect_exact(PROMPT)
    data = saved(child, tmp_path / "m.json")
    users = [m["content"] for m in data["messages"] if m["role"] == "user"]
    assert users == ["line one\nline two", "pasted one\npasted two"]
    child.sendline("!exit")
    child.expect(pexpect.EOF)


def test_ctrl_c_at_prompt_explains_and_colour_on_terminal(tiny_llama, tmp_path):
    child = spawn(tiny_llama, tmp_path=tmp_path, color=True)
    child.sendintr()
    # CPython's readline notices a signal only when it interrupts its select(): one that lands between the
    # prompt's output and the select (a CPU-starved moment; the model is loading beside it) waits for the
    # next key. The test's Ctrl+C comes within milliseconds of the prompt, so it may take a second one.
    if child.expect_exact(["(Ctrl+D or !exit to quit)", pexpect.TIMEOUT], timeout=10) == 1:
        child.sendintr()
        child.expect_exact("(Ctrl+D or !exit to quit)")
    child.sendline("!nope")
    child.expect_exact("\x1b[31merror: unknown command !nope")
    quit_with_eof(child)


def test_keys_typed_during_a_reply_wait_for_the_prompt(tiny_llama, tmp_path):
    """Typed while a reply streams: not echoed into it, and not lost; a Ctrl+D among them ends the chat at
    the next prompt (the terminal's own line mode would drop it), and the terminal is left as it was."""
    long_reply = ("--max-new-tokens", "200", "--min-new-tokens", "200")
    child = spawn(tiny_llama, *long_reply, tmp_path=tmp_path, then="stty -a")
    child.sendline("Hello")
    child.expect_exact("tiny-llama0: ")
    child.send("!status\r")
    child.expect_exact("(stopped at 200 tokens")
    assert "!status" not in child.before  # not echoed into the reply
    child.expect_exact(PROMPT)
    child.expect_exact("last reply")  # the typed-ahead command ran at the prompt
    child.expect_exact(PROMPT)
    child.sendline("Hello again")
    child.expect_exact("tiny-llama0: ")
    child.sendeof()
    child.expect_exact("(stopped at 200 tokens")
    child.expect(r"\bspeed ")  # stty -a ran: chat has exited, without a second Ctrl+D
    child.expect(pexpect.EOF)
    settings = child.before.split()
    assert "icanon" in settings and "echo" in settings and "isig" in settings


def test_prompt_shows_while_the_model_loads_and_a_load_error_interrupts_it(tiny_llama, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_llama / name).read_bytes())
    (broken / "model.safetensors").write_bytes((tiny_llama / "model.safetensors").read_bytes()[:1000])
    child = spawn(broken, tmp_path=tmp_path)  # the prompt comes first: the load is still under way
    child.send("a message half typed")
    child.expect_exact("chat: error: ")  # without Enter: the failed load interrupts the prompt
    child.expect_exact("could not load the weights")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and "Traceback" not in child.before
    # What was typed is not lost: it is in the input history (Up brings it back next time).
    assert "a message half typed" in (tmp_path / "state" / "chat" / "history").read_text()


def test_bad_load_file_fails_before_the_prompt(tiny_llama, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "chat-session", "messages": 5}')
    child = pexpect.spawn(
        sys.executable,
        ["-m", "chat", str(tiny_llama), "--load", str(bad)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "XDG_STATE_HOME": str(tmp_path / "state")},
        encoding="utf-8",
        timeout=120,
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and "User:" not in child.before and "nothing was loaded" in child.before


def test_help_and_exit_need_no_model(tiny_llama, tmp_path):
    child = spawn(tiny_llama, "--max-new-tokens", "4", tmp_path=tmp_path)
    child.sendline("!help")
    child.expect_exact("!status")
    child.expect_exact(PROMPT)
    child.sendline("Hello")  # waits for the model if it is still loading, then says what runs it
    child.expect_exact("(torchscript on cpu, ")  # exported on first use
    child.expect_exact("tiny-llama0: ")
    child.expect_exact(PROMPT)
    child.sendline("!exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_leaving_while_the_model_loads(tiny_llama, tmp_path):
    child = spawn(tiny_llama, tmp_path=tmp_path)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


def test_hub_model_from_the_cache_loads_behind_the_prompt(tiny_llama, tmp_path, monkeypatch):
    """A Hub id is found in the Hugging Face cache before the prompt, then loads like a local model; the
    session still names it by its id; it is exported on first use as a local model is."""
    import shutil

    commit = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-chat"
    shutil.copytree(tiny_llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    child = spawn("someone/tiny-chat", "--max-new-tokens", "4", tmp_path=tmp_path)
    child.sendline("Hello")
    child.expect_exact("(torchscript on cpu, ")  # the snapshot, exported on first use
    child.expect_exact("tiny-chat: ")
    child.expect_exact(PROMPT)
    child.sendline("!status")
    child.expect(r"model\s+someone/tiny-chat \(")  # the id, then the snapshot it loaded from
    child.expect_exact(PROMPT)
    quit_with_eof(child)


def test_piped_stdin_replies_only(tiny_llama, tmp_path):
    lines = "Hello\n\n!set max_new_tokens=2\n!bogus\nSecond\n"
    result = subprocess.run(
        [sys.executable, "-m", "chat", str(tiny_llama), "--temperature", "1", "--seed", "3", "--max-new-tokens", "4"],
        input=lines,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1  # the bad command: a script learns that not all went through
    out = result.stdout.splitlines()
    assert "User:" not in result.stdout and out[1] == "max_new_tokens=2" and len(out) == 3
    assert "unknown command !bogus" in result.stderr


def test_block_left_open_at_end_of_input_is_still_sent():
    from chat.terminal import piped_messages

    text = 'first\n"""\nline one\nline two\n'
    assert list(piped_messages(io.StringIO(text))) == ["first", "line one\nline two"]
    assert list(piped_messages(io.StringIO('"""\n'))) == []


def test_bytes_that_are_not_utf8_become_replacement_characters(tiny_llama):
    from chat.terminal import piped_messages

    assert list(piped_messages(io.StringIO("a\udcff b\n\ud800\n"))) == ["a\ufffd b", "\ufffd"]
    result = subprocess.run(
        [sys.executable, "-m", "chat", str(tiny_llama), "--max-new-tokens", "2"],
        input=b"\xff\xfe hi\n",
        capture_output=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr


def test_one_shot_prompt(tiny_llama):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "chat",
            str(tiny_llama),
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "4",
            "--verbose",
            "--seed",
            "2",
            "--temperature",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0 and result.stdout.endswith("\n") and result.stdout.count("\n") >= 1
    assert " tok/s" in result.stderr and "first token" in result.stderr


def test_one_shot_in_a_terminal_prints_only_the_reply(tiny_llama):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "chat", str(tiny_llama), "--prompt", "Hi", "--max-new-tokens", "3"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"},
        encoding="utf-8",
        timeout=120,
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "tiny-llama0:" not in child.before and "User:" not in child.before


def on_screen(written: str) -> list[str]:
    """The lines a terminal shows after `written`: printing characters (wide ones take two cells), newline,
    backspace and erase-to-end-of-line, the only controls a wrapped reply uses."""
    lines: list[list[str]] = [[]]
    column = 0
    for part in re.split("(\x1b\\[K|\n|\x08)", written):
        line = lines[-1]
        if part == "\x1b[K":
            del line[column:]
        elif part == "\n":
            lines.append([])
            column = 0
        elif part == "\b":
            column -= 1
        else:
            for char in part:
                if char_width(char) == 0 and column > 0:  # a combining mark or the like: joins the cell before
                    line[column - 1] += char
                    continue
                cells = [char] + [""] * (char_width(char) - 1)
                line[column : column + len(cells)] = cells
                column += len(cells)
    return ["".join(line) for line in lines]


PROSE = (
    "Paris is the capital of France, and a city of art, fashion and food. Its museums, among them the "
    "Louvre, hold works from every age; extraordinarily-long-hyphenated-words stay whole when they fit."
)


@pytest.mark.parametrize("width", [12, 25, 40, 80])
def test_word_wrap_breaks_only_between_words_however_the_text_arrives(width):
    rng = random.Random(width)
    for _ in range(50):
        wrap, written, at = WordWrap(width, column=7), "", 0
        while at < len(PROSE):
            size = rng.randint(1, 9)
            written += wrap(PROSE[at : at + size])
            at += size
        lines = on_screen("model: " + written)
        assert max(len(line) for line in lines) <= width - 1
        long_words = [w for w in PROSE.split() if len(w) > width - 1]
        if not long_words:  # every word shown whole, in order
            assert " ".join(lines).split() == ["model:", *PROSE.split()]
        else:  # words too long for a line are broken, nothing else is lost
            assert "".join(" ".join(lines).split()) == "model:" + "".join(PROSE.split())


def test_word_wrap_counts_wide_characters_and_keeps_newlines():
    text = "東京は日本の首都です。人口は約千四百万人です。\nA short line.\n\nAnother paragraph\twith a tab."
    wrap = WordWrap(16)
    lines = on_screen("".join(wrap(char) for char in text))
    assert max(sum(map(char_width, line)) for line in lines) <= 15
    after = lines.index("A short line.")
    assert "".join(lines[:after]) == text.split("\n")[0]  # no spaces in Japanese: broken where a line ends
    assert [line.rstrip() for line in lines[after : after + 3]] == ["A short line.", "", "Another"]


def test_a_reply_on_a_terminal_is_wrapped_and_kept_unwrapped(tiny_llama, monkeypatch):
    """Random weights give long runs of odd tokens: what shows never passes the edge, and the chat keeps
    the reply as the model wrote it."""
    monkeypatch.setenv("COLUMNS", "30")
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("NO_COLOR", "1")  # the label plain, to compare

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    session = make_session(tiny_llama, "--max-new-tokens", "120", "--temperature", "1", "--top-k", "0")
    session.screen, session.conversational = Screen(Terminal(), session.screen.err), True
    session.ask("Hello")
    reply = session.conversation.messages[-1]["content"]
    lines = on_screen(session.screen.out.getvalue())
    assert max(sum(map(char_width, line)) for line in lines) <= 29
    assert lines[0].startswith(f"{session.label}:") and len(lines) > 3
    shown = "".join("".join(lines).split())
    assert shown == f"{session.label}:" + "".join(printable(reply).split())


def test_control_characters_in_a_reply_do_not_reach_the_terminal():
    assert printable("a\x1b]0;title\x07b\r\nc\td\x7f") == "a\ufffd]0;title\ufffdb\nc\td\ufffd"
    assert WordWrap(80)("\x1b[2Jcleared?\r\n") == "\ufffd[2Jcleared?\n"
