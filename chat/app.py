"""The application: options in, a chat out. At a terminal, the prompt loop with the model loading behind it;
otherwise one --prompt, or the messages of a pipe, answered in turn."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable

from chat import conversation as storage
from chat.artifact import model_label
from chat.chatfile import writable_problem
from chat.commands import command_name, handle, help_text
from chat.loading import SessionLoad, export_on_first_use, load_session
from chat.options import Options
from chat.params import GenerationParams
from chat.screen import Screen
from chat.session import Session
from chat.signals import Closed, Signals
from chat.source import resolve_model
from chat.terminal import is_interactive, keys_kept_between_prompts, piped_messages, read_message, setup_readline


def run(options: Options) -> int:
    if not options.verbose:
        # Library deprecation chatter (TorchScript, transformers) is for developers, not chat users.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
    signals = Signals()
    signals.install()
    at_terminal = options.prompt is None and is_interactive()
    background = at_terminal and not options.verbose
    if options.load is not None:  # a bad --load file stops the chat before the model is made ready
        storage.load(options.load, GenerationParams())
    source = resolve_model(options, locate=background or options.export)
    export_on_first_use(options, source)
    if at_terminal:
        load = SessionLoad(options, background, source)
        code = interactive(options, load, signals)
        if load.loading:  # left before the model was in: a normal exit would wait for the load thread
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        load.close()
        return code
    # Without a terminal only a chat resumed with --continue is kept (`chat --continue --prompt "and then?"`
    # goes on in its file); a one-shot question or a pipe of its own leaves no file behind.
    keep = options.keep_in is not None and options.keep_in == options.load
    session = load_session(options, source, keep=keep)
    session.signals = signals
    show_notes(session)
    failed = False
    try:
        messages = [options.prompt] if options.prompt is not None else piped_messages(sys.stdin)
        for message in messages:
            failed |= not handle(session, message)
            session.keep()
            if not session.running or signals.closing:
                break
    except Closed:
        session.keep()
    finally:
        session.engine.close()
    if signals.closing:
        return signals.exit_code
    return 1 if failed or session.unsaved() else 0


def show_notes(session: Session) -> None:
    for note in session.engine.notes:
        session.notice(note)


def interactive(options: Options, load: SessionLoad, signals: Signals) -> int:
    save_history = setup_readline()
    try:
        with keys_kept_between_prompts(sys.stdin, sys.stdout) as read:
            converse(options, load, read, signals)
    finally:
        save_history()
    return signals.exit_code if signals.closing else 0


def converse(options: Options, load: SessionLoad, read: Callable[[str], str], signals: Signals) -> None:
    """The prompt loop, until !exit or Ctrl+D (or a closed window); read is what reads a line at the prompt."""
    screen = Screen(wrap=options.wrap)
    style = screen.style
    label = model_label(options.model) if options.model else "chat"
    not_writable = writable_problem(options.keep_in.parent) if options.keep_in is not None else None
    session: Session | None = None
    if load.loading:
        intro = f"chat · {label} · "
    else:
        session = _ready(load, screen, signals, not_writable, announce=False)
        intro = f"chat · {session.label} · {session.engine.describe()} · "
    print(style.note(intro + '!help for commands, """ for multi-line, Ctrl+D to quit'), flush=True)
    if options.load is not None:
        screen.notice(f"(resuming the chat in {options.load})")
    if not_writable:
        screen.notice(
            f"({not_writable}: this chat is not kept on disk; chat tries again after each change, !save PATH)"
        )
    prompt = style.user(f"{options.user}:") + " "
    more = style.user("...") + " "
    warned = False  # about leaving with changes not on disk
    try:
        while True:
            try:
                text = read_message(prompt, more, read)
            except KeyboardInterrupt:
                print()
                screen.notice("(Ctrl+D or !exit to quit)")
                continue
            except EOFError:
                print()
                text = "!exit"
            if session is None:  # the model is still loading: only !help and !exit go without it
                command = command_name(text) if text.lstrip().startswith("!") else None
                if not text.strip():
                    continue
                if command == "help":
                    print(help_text(), flush=True)
                    continue
                if command == "exit":
                    break
                try:
                    session = _ready(load, screen, signals, not_writable)
                except KeyboardInterrupt:
                    print()
                    screen.notice("(not sent: the model is still loading; Up brings the message back)")
                    continue
            try:
                handle(session, text)
            except KeyboardInterrupt:  # outside a reply (a command, the prompt being built): stop that only
                print()
                screen.notice("(interrupted)")
            session.keep()
            if signals.closing:
                break
            if not session.running:
                why = session.unsaved()
                if why is None or warned:
                    break
                session.error(
                    f"the chat's last changes are not on disk ({why}); !save PATH saves them, "
                    "and Ctrl+D (or !exit) again leaves without"
                )
                session.running, warned = True, True
    except Closed:
        pass
    if session is None:
        return
    with contextlib.suppress(Closed):
        session.keep()
    if session.chat_file.written and session.unsaved() is None:
        screen.notice(f"(kept in {session.chat_file.path}; chat --continue resumes it)")


def _ready(
    load: SessionLoad, screen: Screen, signals: Signals, not_writable: str | None, announce: bool = True
) -> Session:
    """The session once loaded (in the background), told to the person in one line with what runs it.
    not_writable: why the save directory took no file at start (said then, so not again at the first write)."""
    session = load.session(screen.notice)
    session.conversational = True
    session.signals = signals
    session.chat_file.failure = not_writable
    if announce:
        session.notice(f"({session.engine.describe()})")
    show_notes(session)
    return session
