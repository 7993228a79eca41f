"""The session and its `!` commands, on a real tiny model."""

from __future__ import annotations

import io
import json
import os
import stat

import pytest
import torch
from helpers import make_session, output

from chat.backends.base import LoadOptions, cpu_threads
from chat.cli import parse_args
from chat.commands import handle
from chat.loading import load_session
from chat.screen import Screen


@pytest.fixture
def session(tiny_llama):
    # Sampling, not greedy: greedy on random weights repeats one token (often a newline, shown as nothing).
    return make_session(tiny_llama, "--max-new-tokens", "8", "--temperature", "1", "--top-k", "0")


def test_message_gets_reply_and_history(session):
    assert session.ask("Hello, how are you?")
    out, _ = output(session)
    roles = [m["role"] for m in session.conversation.messages]
    assert roles == ["user", "assistant"]
    assert out.strip() and out == session.conversation.messages[1]["content"] + "\n"
    assert session.last_stats.prompt_tokens > 0 and session.last_stats.new_tokens > 0


def test_seed_reproduces_and_regen_replaces(session):
    handle(session, "!set seed=5")
    session.ask("Hello")
    first = session.conversation.messages[-1]["content"]
    assert first
    handle(session, "!regen")
    assert len(session.conversation.messages) == 2
    assert session.conversation.messages[-1]["content"] != first  # the random sequence went on
    handle(session, "!set seed=5")
    handle(session, "!regen")
    assert session.conversation.messages[-1]["content"] == first


def test_help_lists_every_command(session):
    from chat.commands import COMMANDS

    handle(session, "!help")
    out, _ = output(session)
    for name in COMMANDS:
        assert f"!{name}" in out


@pytest.mark.parametrize("line", ["!exit", "!quit", "!EXIT", "!Quit"])
def test_exit_any_case(session, line):
    handle(session, line)
    assert not session.running


def test_unknown_command_suggests(session):
    handle(session, "!stauts")
    _out, err = output(session)
    assert "unknown command !stauts; did you mean !status?" in err and session.running


def test_set_changes_and_checks(session):
    handle(session, "!set temperature=0.3 top_k=7 seed=3")
    out, _ = output(session)
    assert "temperature=0.3" in out and session.params.top_k == 7 and session.params.seed == 3
    before = session.params
    for bad, message in [
        ("!set temperature=warm", "temperature must be a number"),
        ("!set top_p=2", "top_p must be"),
        ("!set nonsense=1", "unknown parameter 'nonsense'"),
        ("!set temperature", "not key=value"),
        ("!set", "usage: !set"),
        ("!set top_k=3 temperature=x", "temperature must be"),  # all or nothing
        ("!set min_new_tokens=50 max_new_tokens=10", "is above max_new_tokens"),
    ]:
        handle(session, bad)
        _, err = output(session)
        assert message in err, bad
        assert session.params == before, bad


def test_status_shows_everything(session):
    session.ask("Hello")
    output(session)
    handle(session, "!status")
    out, _ = output(session)
    for word in (
        "model",
        "backend",
        "transformers",
        "cpu",
        "float32",
        "temperature=1.0",
        "context",
        "/ 256 tokens",
        "last reply",
        "tok/s",
        "first token",
        f"cpu, float32, {torch.get_num_threads()} thread",
    ):
        assert word in out


@pytest.mark.parametrize("backend", ["transformers", "torchscript"])
def test_threads_option_sets_torch_threads(request, backend):
    model = request.getfixturevalue("tiny_llama" if backend == "transformers" else "llama_artifact")
    before = torch.get_num_threads()
    try:
        session = load_session(parse_args([str(model), "--threads", "1", "--backend", backend]), keep=False)
        assert torch.get_num_threads() == 1 and session.engine.info.threads == 1
        session.screen = Screen(io.StringIO(), io.StringIO())
        handle(session, "!status")
        out = output(session)[0]
        assert "cpu, float32, " in out and ", 1 thread (--threads)\n" in out
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("alerts", [True, False], ids=["posix", "no-pthread_kill"])
def test_background_load_gives_this_thread_the_threads_asked_for(llama_artifact, monkeypatch, alerts):
    import signal

    from chat.loading import SessionLoad

    if not alerts:  # as on Windows: no SIGUSR1 alert, the rest is the same
        monkeypatch.delattr(signal, "pthread_kill")
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    try:
        load = SessionLoad(parse_args([str(llama_artifact), "--threads", str(wanted)]), background=True)
        notices = []
        session = load.session(notices.append)
        # torch's thread count is per OpenMP thread: the load thread's setting alone would leave this one as it was.
        assert session.engine.info.threads == wanted and torch.get_num_threads() == wanted
        assert not load.loading and notices in ([], ["(loading the model ...)"])
    finally:
        torch.set_num_threads(before)


def test_background_load_warms_up_and_replies_as_a_cold_load(llama_artifact):
    """The background load runs the model once on the prompt's start, which stays cached; the first reply
    is token for token what a cold session gives."""
    from chat.loading import SessionLoad

    argv = [str(llama_artifact), "--temperature", "0", "--max-new-tokens", "8", "--system", "Be brief."]
    warm = SessionLoad(parse_args(argv), background=True).session(lambda _: None)
    cold = load_session(parse_args(argv), keep=False)
    assert warm.engine.backend._cached and not cold.engine.backend._cached
    replies = []
    for session in (warm, cold):
        session.screen = Screen(io.StringIO(), io.StringIO())
        assert session.ask("Hello there")
        replies.append(session.conversation.messages[-1]["content"])
    assert replies[0] == replies[1]


def test_background_load_failure_is_raised_where_the_session_is_asked_for(tmp_path):
    from chat.errors import ChatError
    from chat.loading import SessionLoad

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ChatError, match="no weights"):
        # The SIGUSR1 alert may come first, even before session() is asked: it raises the same error, once.
        load = SessionLoad(parse_args([str(tmp_path), "--backend", "transformers"]), background=True)
        load.session(lambda _: None)


def test_cpu_threads_default(monkeypatch):
    import os

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads() == 1
    assert cpu_threads(LoadOptions(model="m", threads=3)) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert cpu_threads() == len(os.sched_getaffinity(0))


def test_clear_keeps_system(tiny_llama):
    session = make_session(tiny_llama, "--system", "Be brief.", "--max-new-tokens", "4")
    session.ask("Hi")
    handle(session, "!clear")
    assert session.conversation.messages == [] and session.conversation.system == "Be brief."


def test_system_show_and_set(session):
    handle(session, "!system")
    assert "no system prompt" in output(session)[0]
    handle(session, "!system You are a pirate.")
    handle(session, "!system")
    assert "You are a pirate." in output(session)[0]
    assert session.conversation.in_context()[0] == {"role": "system", "content": "You are a pirate."}


def test_undo(session):
    handle(session, "!undo")
    assert "nothing to undo" in output(session)[0]
    session.ask("One")
    session.ask("Two")
    handle(session, "!undo")
    assert [m["content"] for m in session.conversation.messages if m["role"] == "user"] == ["One"]


def test_regen_that_fails_keeps_message_and_reply(session):
    session.ask("Hello")
    before = list(session.conversation.messages)
    handle(session, "!system " + "word " * 400)  # over the tiny model's 256-token context
    handle(session, "!regen")
    assert "shorten it or the system prompt" in output(session)[1]
    assert session.conversation.messages == before


def test_regen_without_message(session):
    handle(session, "!regen")
    assert "nothing to regenerate" in output(session)[0]


def test_save_load_round_trip(session, tmp_path, tiny_llama):
    handle(session, "!system Be brief.")
    session.ask("Hello")
    handle(session, "!set top_k=9")
    path = tmp_path / "sub" / "s.json"
    handle(session, f"!save {path}")
    assert "saved 2 message(s)" in output(session)[0]
    data = json.loads(path.read_text())
    assert [set(m) for m in data["messages"]] == [{"role", "content"}] * 2
    assert data["system"] == "Be brief." and data["parameters"]["top_k"] == 9
    assert data["model"] == str(tiny_llama) and data["backend"] == "transformers"
    assert "created" in data and "saved" in data
    assert not list(path.parent.glob(".*.tmp"))  # the temporary file was renamed away

    other = make_session(tiny_llama)
    handle(other, f"!load {path}")
    assert "loaded 2 message(s)" in output(other)[0]
    assert other.conversation.messages == session.conversation.messages
    assert other.conversation.system == "Be brief." and other.params.top_k == 9


def test_save_default_dir(tiny_llama, tmp_path):
    session = make_session(tiny_llama, "--save-dir", str(tmp_path / "sessions"))
    handle(session, "!save")
    files = list((tmp_path / "sessions").glob("chat-*.json"))
    assert len(files) == 1 and str(files[0]) in output(session)[0]


def test_a_chat_is_kept_after_each_change_in_a_file_of_its_own(tiny_llama, tmp_path):
    """Autosave: written when the chat changed, the question before its reply; !clear empties the file's
    chat (the file goes) and !load starts a new file (the chat before stays in its own); a file of the same
    name from another chat is not overwritten."""
    sessions = tmp_path / "sessions"
    session = make_session(tiny_llama, "--save-dir", str(sessions), "--max-new-tokens", "2", keep=True)
    taken = session.chat_file.path
    sessions.mkdir()
    taken.write_text("another chat's")
    session.keep()
    assert list(sessions.iterdir()) == [taken]  # nothing to keep yet
    session.ask("first")
    first = session.chat_file.path
    assert first.name == f"{taken.stem}-2.json" and taken.read_text() == "another chat's"
    assert [m["role"] for m in json.loads(first.read_text())["messages"]] == ["user"]  # before the reply
    session.keep()
    assert [m["role"] for m in json.loads(first.read_text())["messages"]] == ["user", "assistant"]
    written = first.stat().st_mtime_ns
    handle(session, "!status")
    session.keep()
    assert first.stat().st_mtime_ns == written  # no change, no write
    handle(session, "!set temperature=0.3")
    session.keep()
    assert json.loads(first.read_text())["parameters"]["temperature"] == 0.3
    output(session)
    handle(session, "!clear")
    assert f"history cleared; {first} is removed" in output(session)[0]
    session.keep()
    assert not first.exists()
    session.ask("second")
    session.keep()
    assert session.chat_file.path == first and json.loads(first.read_text())["messages"][0]["content"] == "second"
    saved = sessions / "saved.json"
    handle(session, f"!save {saved}")
    handle(session, f"!load {saved}")
    session.ask("third")
    session.keep()
    third = session.chat_file.path
    assert third not in (first, saved) and len(json.loads(first.read_text())["messages"]) == 2
    assert [m["content"] for m in json.loads(third.read_text())["messages"]][::2] == ["second", "third"]
    output(session)
    handle(session, "!save")  # without a path: the chat's own file
    assert f"to {third}" in output(session)[0] and len(list(sessions.iterdir())) == 4
    handle(session, "!status")
    assert f"kept in     {third}\n" in output(session)[0]


def test_undo_of_the_only_exchange_removes_the_file(tiny_llama, tmp_path):
    session = make_session(tiny_llama, "--save-dir", str(tmp_path), "--max-new-tokens", "2", keep=True)
    session.ask("gone soon")
    session.keep()
    path = session.chat_file.path
    assert path.exists()
    handle(session, "!undo")
    session.keep()
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_a_chat_that_cannot_be_kept_says_so_once_retries_and_says_when_it_is_kept_again(tiny_llama, tmp_path):
    sessions = tmp_path / "sessions"
    sessions.write_text("a file where the directory should be")  # root may write anywhere else
    session = make_session(tiny_llama, "--save-dir", str(sessions), "--max-new-tokens", "2", keep=True)
    session.ask("Hello")
    session.keep()
    err = output(session)[1]
    assert "cannot write" in err and "not on disk: chat tries again after the next change" in err
    assert err.count("\n") == 1 and session.unsaved()
    handle(session, "!status")
    assert "kept in     not on disk:" in output(session)[0]
    assert session.ask("Again")
    session.keep()
    assert output(session)[1] == "" and session.unsaved()  # said once
    sessions.unlink()
    session.ask("Once more")
    session.keep()
    assert session.unsaved() is None and len(json.loads(session.chat_file.path.read_text())["messages"]) == 6


def test_save_dir_follows_xdg(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    session = make_session(tiny_llama)
    handle(session, "!save")
    assert len(list((tmp_path / "xdg" / "chat" / "sessions").glob("chat-*.json"))) == 1


def test_save_to_directory_or_unwritable(session, tmp_path):
    handle(session, f"!save {tmp_path}")
    assert "is a directory" in output(session)[1]
    (tmp_path / "file").write_text("x")
    handle(session, f"!save {tmp_path / 'file' / 'below.json'}")
    assert "cannot write" in output(session)[1] and session.running


BROKEN = {
    "missing": (None, "no file"),
    "not json": ("{oops", "not valid JSON"),
    "a list": ("[1, 2]", "not a saved chat session"),
    "no messages": ('{"hello": 1}', "not a saved chat session"),
    "foreign format": ('{"format": "other-tool", "messages": []}', "not a chat session"),
    "newer": ('{"format": "chat-session", "version": 99, "messages": []}', "newer chat"),
    "bad message": ('{"messages": [{"role": "wizard", "content": "x"}]}', "message 1 is not"),
    "bad content": ('{"messages": [{"role": "user", "content": 5}]}', "message 1 is not"),
    "bad parameter": ('{"messages": [], "parameters": {"temperature": "hot"}}', "temperature must be"),
    "unknown parameter": ('{"messages": [], "parameters": {"warp": 9}}', "unknown parameter"),
    "binary": (b"\xff\xfe\x00garbage", "cannot read"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_load_broken_file_changes_nothing(session, tmp_path, case):
    content, message = BROKEN[case]
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    session.ask("Keep me")
    before = (list(session.conversation.messages), session.params, session.conversation.system)
    handle(session, f"!load {path}")
    _, err = output(session)
    assert message in err and len(err.strip().splitlines()) == 1
    assert (session.conversation.messages, session.params, session.conversation.system) == before


def test_load_other_tools_messages(session, tmp_path):
    path = tmp_path / "openai.json"
    path.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "U"},
                    {"role": "assistant", "content": "A"},
                ]
            }
        )
    )
    handle(session, f"!load {path}")
    assert session.conversation.system == "S"
    assert [m["content"] for m in session.conversation.messages] == ["U", "A"]


def test_text_that_is_not_unicode_is_made_readable(session, tmp_path, tiny_llama):
    """Lone surrogates (bytes that are not UTF-8, or JSON's \\udcff) would crash the tokenizer and !save."""
    path = tmp_path / "odd.json"
    path.write_text('{"system": "s\\ud800", "messages": [{"role": "user", "content": "hi \\udcff"}]}')
    handle(session, f"!load {path}")
    assert session.conversation.system == "s\ufffd"
    assert session.conversation.messages[0]["content"] == "hi \ufffd"
    assert session.ask("again") and "\ufffd" in session.conversation.messages[0]["content"]
    options = parse_args([str(tiny_llama), "--prompt", "caf\udcff", "--system", "\udcff"])
    assert options.prompt == "caf\ufffd" and options.system == "\ufffd"


def test_a_path_the_file_system_refuses_costs_one_line(session):
    session.ask("Hello")
    output(session)
    handle(session, "!save " + "b/" * 3000)
    err = output(session)[1]
    assert err.startswith("error: File name too long: b/b/") and err.count("\n") == 1 and "nothing was changed" in err
    assert session.running and len(session.conversation.messages) == 2


def test_save_writes_through_a_link_and_never_replaces_a_device_or_pipe(session, tmp_path):
    """The atomic rename must not turn /dev/null (as root) or a pipe into a file, nor a link into a copy."""
    pipe, target, link = tmp_path / "pipe", tmp_path / "real.json", tmp_path / "link.json"
    os.mkfifo(pipe)
    handle(session, f"!save {pipe}")
    assert "is not a regular file; pick another path" in output(session)[1]
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    link.symlink_to(target)
    handle(session, f"!save {link}")
    assert link.is_symlink() and json.loads(target.read_text())["messages"] == []


def test_replies_are_labelled_with_the_models_name():
    from chat.artifact import model_label

    assert model_label("models/smollm2-135m-instruct/") == "smollm2-135m-instruct"
    assert model_label("models/smollm2-135m-instruct/torchscript/cpu-float32-int8") == "smollm2-135m-instruct"
    assert model_label("/tmp/smol-int8") == "smol-int8" and model_label("openai-community/gpt2") == "gpt2"


def test_load_needs_path_and_lists_the_chats_kept_last(tiny_llama, tmp_path):
    session = make_session(tiny_llama, "--save-dir", str(tmp_path), "--max-new-tokens", "2", keep=True)
    handle(session, "!load")
    assert "usage: !load PATH" in output(session)[1]
    session.ask("Hello")
    session.keep()
    output(session)
    handle(session, "!load")
    out, err = output(session)
    assert err == "" and out.startswith(f"usage: !load PATH; the chats kept last in {tmp_path}:\n")
    assert f"{session.chat_file.path}  " in out and '2 messages  tiny-llama0  "Hello"' in out


def test_context_drop_oldest(tiny_llama):
    # The tiny model has 256 tokens of context; 200 are kept for the reply, leaving 56 for the prompt.
    session = make_session(tiny_llama, "--max-new-tokens", "200", "--min-new-tokens", "0", "--temperature", "0")
    session.params = session.params.replace(max_new_tokens=200)
    for text in ("First message here", "Second message here", "Third message here"):
        session.conversation.add("user", text)
        session.conversation.add("assistant", "A reply of some words")
    assert session.ask("Fourth")
    _, err = output(session)
    assert "dropped the" in err and "oldest exchange" in err
    assert session.conversation.context_start > 0
    assert session.conversation.messages[0]["content"] == "First message here"  # kept in the history


def test_context_error_policy(tiny_llama):
    session = make_session(tiny_llama, "--max-new-tokens", "200", "--context-policy", "error")
    for text in ("First message here", "Second message here", "Third message here"):
        session.conversation.add("user", text)
        session.conversation.add("assistant", "A reply of some words")
    assert not session.ask("Fourth")
    _, err = output(session)
    assert "!undo or !clear" in err and len(session.conversation.messages) == 6


def test_message_longer_than_context_refused(session):
    session.ask("Hi")
    before = list(session.conversation.messages)
    assert not session.ask("word " * 400)
    _, err = output(session)
    assert "shorten it" in err and session.conversation.messages == before
    assert session.conversation.context_start == 0
    assert session.ask("Still here?")


def test_max_new_tokens_bigger_than_context_caps_the_reply(session):
    handle(session, "!set max_new_tokens=1000")
    assert session.ask("Hi")
    assert "(this reply can be at most" in output(session)[1]


def test_plain_transcript_for_model_without_template(tiny_gpt2):
    session = make_session(tiny_gpt2, "--max-new-tokens", "6", "--user", "Ana")
    assert not session.engine.backend.tokenizer.has_chat_template
    session.ask("Hello")
    session.ask("Again")
    from chat.prompt import render_plain

    text = render_plain(session.conversation.in_context(), "Ana")
    assert text.startswith("Ana: Hello\nAssistant: ") and text.endswith(
        "Ana: Again\nAssistant: " + session.conversation.messages[-1]["content"] + "\nAssistant:"
    )


def test_model_recommendations_then_user_choices(tiny_llama, tmp_path):
    import shutil

    from chat.cli import parse_args
    from chat.loading import load_session

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 2, "do_sample": True, "temperature": 0.2, "top_p": 0.9, "top_k": "bad"})
    )
    session = load_session(parse_args([str(model), "--top-p", "0.5"]), keep=False)
    assert (session.params.temperature, session.params.top_p, session.params.top_k) == (0.2, 0.5, 50)
    (model / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.1}))
    assert load_session(parse_args([str(model)]), keep=False).params.temperature == 0.7  # not sampling: no advice taken
