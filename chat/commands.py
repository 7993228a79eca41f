"""What a line typed in the chat does: a message to send, or one of the `!` commands (each takes the session and
the rest of the line)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chat import conversation as storage
from chat.engine import Row
from chat.errors import ChatError, file_error
from chat.params import PARSERS, SET, parse_assignments
from chat.session import Session


@dataclass
class Command:
    usage: str
    help: str
    run: Callable[[Session, str], None]


def help_text() -> str:
    width = max(len(c.usage) for c in COMMANDS.values())
    lines = [f"  {c.usage:<{width}}  {c.help}" for c in COMMANDS.values()]
    lines.append("")
    lines.append("  parameters for !set: " + ", ".join(PARSERS))
    lines.append('  a line """ starts a multi-line message, another ends it; Ctrl+C stops a reply')
    lines.append("  !!text sends a message that starts with ! (here: !text)")
    return "\n".join(lines)


def do_help(session: Session, rest: str) -> None:
    session.say(help_text())


def do_exit(session: Session, rest: str) -> None:
    session.running = False


def do_set(session: Session, rest: str) -> None:
    changes = parse_assignments(rest.split())
    session.set_params(session.params.replace(**changes), reseed="seed" in changes)
    session.param_sources.update(dict.fromkeys(changes, SET))
    session.say(" ".join(f"{key}={getattr(session.params, key)}" for key in changes))


def do_status(session: Session, rest: str) -> None:
    engine = session.engine
    sources = session.param_sources
    params = " ".join(
        f"{k}={v}" + (f" ({sources[k]})" if k in sources else "") for k, v in session.params.as_dict().items()
    )
    history = session.conversation
    dropped = f", {history.context_start} message(s) dropped from context" if history.context_start else ""
    used = session.context_tokens()
    limit = engine.context_length
    tokens = f"{'?' if used is None else used} / {limit if limit is not None else '? (the server does not say)'} tokens"
    rows = [
        *engine.status(),
        Row("parameters", params),
        Row("system", history.system if history.system else "(none)"),
        Row("context", f"{tokens}, {len(history.messages)} messages" + dropped),
    ]
    stats = session.last_stats
    if stats is not None:
        rows.append(Row("last reply", stats.line()))
    rows.append(Row("kept in", where_kept(session)))
    width = max(len(row.name) for row in rows)
    session.say("\n".join(f"{row.name:<{width}}  {row.value}" for row in rows))


def where_kept(session: Session) -> str:
    """Where the chat is kept as it goes (see ChatFile), for !status."""
    file = session.chat_file
    if file.path is None:  # --no-autosave, or not at a terminal
        return "nowhere (!save PATH saves the chat)"
    if file.failure is not None:
        return f"not on disk: {file.failure} (chat tries again after each change; !save PATH)"
    return str(file.path) if file.written else f"{file.path} (from the first message)"


def do_clear(session: Session, rest: str) -> None:
    session.conversation.clear()
    file = session.chat_file
    kept = file.path if file.owned and file.path is not None and file.path.exists() else None
    session.say(
        "history cleared"
        + (" (system prompt kept)" if session.conversation.system else "")
        + (f"; {kept} is removed" if kept else "")
    )


NO_SYSTEM = ("none", "-")  # !system none: no system prompt


def do_system(session: Session, rest: str) -> None:
    if not rest:
        session.say(session.conversation.system or "(no system prompt; set one with !system TEXT)")
        return
    if rest.lower() in NO_SYSTEM:
        session.conversation.system = None
        session.say("system prompt removed")
        return
    session.conversation.system = rest
    session.say("system prompt set")


def do_undo(session: Session, rest: str) -> None:
    dropped = session.conversation.undo()
    session.say(f"removed the last exchange ({dropped} message(s))" if dropped else "nothing to undo")


def do_regen(session: Session, rest: str) -> None:
    messages = session.conversation.messages
    previous = messages.pop() if messages and messages[-1]["role"] == "assistant" else None
    if not messages or messages[-1]["role"] != "user":
        session.say("nothing to regenerate: send a message first")
    elif session.respond():
        return
    if previous is not None:  # no new reply: keep the old one
        messages.append(previous)


def do_edit(session: Session, rest: str) -> None:
    if not (session.conversational and session.screen.at_terminal()):
        raise ChatError("!edit opens your editor, so it needs a terminal; send the message itself instead")
    from chat.terminal import compose_in_editor

    text = compose_in_editor(rest).strip()
    if not text:
        session.say("nothing sent (the message was left empty)")
        return
    session.say(text)
    session.ask(text)


def do_save(session: Session, rest: str, replace_any: bool = False) -> None:
    if rest:
        path = Path(rest).expanduser()
    elif session.chat_file.on:  # the chat's own file, where it is kept as it goes
        path = session.chat_file.own_path()
    else:
        path = storage.new_session_file(session.options.save_dir)
    if path.is_dir():
        raise ChatError(f"{path} is a directory; give a file name, like !save {path / 'chat.json'}")
    session.save(path, replace_any=replace_any)
    session.say(f"saved {len(session.conversation.messages)} message(s) to {path}")


def do_save_over(session: Session, rest: str) -> None:
    if not rest:
        raise ChatError("usage: !save! PATH (replaces PATH even if it is not a chat file)")
    do_save(session, rest, replace_any=True)


def do_load(session: Session, rest: str) -> None:
    if not rest:
        kept = session.options.save_dir
        files = storage.session_files(kept)[:10]
        if not files:
            raise ChatError("usage: !load PATH (a file written by !save)")
        listing = "\n".join(storage.describe_session_file(path) for path in files)
        session.say(f"usage: !load PATH; the chats kept last in {kept}:\n{listing}")
        return
    session.load(Path(rest))
    session.chat_file.start_new(session.options.save_dir)
    session.say(f"loaded {len(session.conversation.messages)} message(s) from {Path(rest).expanduser()}")


COMMANDS: dict[str, Command] = {
    "help": Command("!help", "show this list", do_help),
    "exit": Command("!exit, !quit", "leave the chat (also Ctrl+D)", do_exit),
    "set": Command("!set key=value ...", "change generation parameters", do_set),
    "status": Command("!status", "model, backend, parameters, context, last reply's speed, chat file", do_status),
    "clear": Command("!clear", "forget the history, on disk too (the system prompt stays)", do_clear),
    "system": Command("!system [TEXT|none]", "show, set or (none) remove the system prompt", do_system),
    "undo": Command("!undo", "remove the last exchange", do_undo),
    "regen": Command("!regen", "answer the last message again", do_regen),
    "edit": Command("!edit [TEXT]", "write a message in your editor ($EDITOR), then send it", do_edit),
    "save": Command("!save [PATH]", "save the session as JSON (default: in --save-dir)", do_save),
    "save!": Command("!save! PATH", "save, replacing PATH even if it is not a chat file", do_save_over),
    "load": Command("!load PATH", "restore a saved session (without PATH: list the chats kept last)", do_load),
}
ALIASES = {"quit": "exit"}


def command_name(line: str) -> str:
    """The command a `!` line names, aliases resolved (may be unknown)."""
    word = line.removeprefix("!").strip().partition(" ")[0]
    return ALIASES.get(word.lower(), word.lower())


def run_command(session: Session, line: str) -> bool:
    """Run one `!` line; False when it failed. A bad command or argument gets one line; the session always
    goes on."""
    word, _, rest = line.removeprefix("!").strip().partition(" ")
    name = command_name(line)
    command = COMMANDS.get(name)
    if command is None:
        known = [*COMMANDS, *ALIASES]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"did you mean !{close[0]}? " if close else ""
        session.error(f"unknown command !{word}; {hint}(!help lists them)")
        return False
    try:
        command.run(session, rest.strip())
    except ChatError as why:
        session.error(str(why))
    except OSError as why:  # the file system refused a path given (too long, say) where no check expected it
        session.error(f"{file_error(why)}; nothing was changed")
    else:
        return True
    return False


def handle(session: Session, text: str) -> bool:
    """One line (or block) of input: a command, a message, or nothing; False when it failed (a command's
    error, or a message that got no reply)."""
    text = text.strip()
    if not text:
        return True
    if text.startswith("!!"):  # a message that starts with "!"
        return session.ask(text[1:])
    if text.startswith("!"):
        return run_command(session, text)
    return session.ask(text)
