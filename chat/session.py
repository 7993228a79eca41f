"""The chat session: one conversation with one loaded model, driven by a terminal, a pipe or --prompt."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from chat import conversation as storage
from chat.artifact import model_label
from chat.conversation import Conversation
from chat.errors import ChatError
from chat.params import GenerationParams
from chat.prompt import build_prompt, encode
from chat.terminal import (
    Style,
    WordWrap,
    columns,
    is_interactive,
    keys_kept_between_prompts,
    piped_messages,
    printable,
    read_message,
    setup_readline,
)

if TYPE_CHECKING:
    from chat.backends.base import Backend
    from chat.cli import Options
    from chat.generation import ReplyStats
    from chat.loading import SessionLoad


class Session:
    def __init__(
        self,
        backend: Backend,
        options: Options,
        conversation: Conversation,
        params: GenerationParams,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
    ):
        import torch

        self.backend = backend
        self.options = options
        self.conversation = conversation
        self.params = params
        self.out, self.err = out, err
        self.style = Style(out)
        self.label = model_label(options.model)
        self.last_stats: ReplyStats | None = None
        self.running = True
        self.conversational = False  # a person at a terminal: label replies, remark on cut-off ones
        self.generator = torch.Generator(device=backend.info.device)
        self.reseed()
        # Autosave (see keep): the chat as last written to options.keep_in, or as it began; whether that file
        # is this chat's own (written by it, or resumed with --continue); whether this run wrote it.
        self.kept = self.record()
        self.owns_file = options.keep_in is not None and options.keep_in == options.load
        self.wrote = False

    # --- output -------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def notice(self, text: str) -> None:
        """A remark about the session (not part of a reply): stderr, so piped stdout stays clean."""
        print(self.style.note(text), file=self.err, flush=True)

    def error(self, text: str) -> None:
        print(self.style.error(f"error: {text}"), file=self.err, flush=True)

    # --- state --------------------------------------------------------------------------------

    def reseed(self) -> None:
        seed = self.params.seed if self.params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator.manual_seed(seed)

    def set_params(self, params: GenerationParams, reseed: bool = False) -> None:
        """Use new parameters; a new (or re-given) seed restarts the random sequence."""
        reseed = reseed or params.seed != self.params.seed
        self.params = params
        if reseed:
            self.reseed()

    def context_tokens(self) -> int:
        if not self.conversation.in_context():
            return 0
        return len(encode(self.backend.tokenizer, self.conversation.in_context(), self.options.user))

    def record(self) -> str:
        info = self.backend.info
        return json.dumps(storage.record(self.conversation, self.params, model=info.model, backend=info.name))

    def save(self, path: Path) -> None:
        info = self.backend.info
        storage.save(path, self.conversation, self.params, model=info.model, backend=info.name)
        if path.expanduser() == self.options.keep_in:
            self.kept, self.owns_file, self.wrote = self.record(), True, True

    def keep(self) -> None:
        """Write the chat to its file (options.keep_in) if it changed since: a chat at the terminal is not lost
        to a closed window or a forgotten !save. A new chat takes a free name at its first write."""
        if self.options.keep_in is None or not self.conversation.messages or self.record() == self.kept:
            return
        try:
            self.save(self.own_file())
        except ChatError as why:
            self.options.keep_in, self.wrote = None, False  # what the file holds is out of date now: no "kept in"
            self.error(f"{why}; this chat is not kept on disk from now on (!save PATH saves it)")

    def own_file(self) -> Path:
        """options.keep_in, renamed first if a file of that name is another chat's (started the same second)."""
        path = self.options.keep_in
        assert path is not None
        if not self.owns_file:
            for number in itertools.count(2):
                if not path.exists():
                    break
                path = path.with_name(f"{self.options.keep_in.stem}-{number}.json")
            self.options.keep_in = path
        return path

    def start_new_file(self) -> None:
        """Keep what follows in a file of its own (after !clear or !load: the chat before stays in its file)."""
        if self.options.keep_in is not None and self.owns_file:
            self.options.keep_in = storage.new_session_file(self.options.save_dir)
            self.owns_file = False

    def load(self, path: Path) -> None:
        self.conversation, params = storage.load(path, self.params)
        self.set_params(params)

    def warm_up(self) -> None:
        """Do what a first reply would wait for, while the person is still typing: the chat template's first
        render, the tokenizer's first calls, and the model's first runs (TorchScript sets its graphs up on the
        first call: 40 of the 78 ms of a first 37-token prefill on 2 cores). The prompt's start, which the
        first message will share (the system prompt, or a resumed conversation), stays in the model's cache."""
        messages = [*self.conversation.in_context(), {"role": "user", "content": ""}]
        with contextlib.suppress(Exception):  # a failure shows, in words, when the first message meets it
            ids = encode(self.backend.tokenizer, messages, self.options.user)
            if len(ids) <= self.backend.info.context_length - self.params.max_new_tokens:
                self.backend.decode(int(self.backend.prefill(ids).argmax()))

    # --- replies ------------------------------------------------------------------------------

    def ask(self, text: str) -> bool:
        """Send a user message and stream the reply; False when no reply could be made (the message is taken
        back, so a refused message does not haunt the next turn)."""
        self.conversation.add("user", text)
        if self.respond():
            return True
        self.conversation.messages.pop()
        return False

    def respond(self) -> bool:
        """Answer the last user message; False (and the history unchanged) when no reply could be made."""
        from chat.generation import ReplyStream

        try:
            prompt = build_prompt(
                self.backend.tokenizer,
                self.conversation,
                context_length=self.backend.info.context_length,
                max_new_tokens=self.params.max_new_tokens,
                policy=self.options.context_policy,
                user_label=self.options.user,
            )
        except ChatError as why:
            self.error(str(why))
            return False
        if prompt.dropped:
            self.notice(f"(dropped the {prompt.dropped} oldest exchange(s) to fit the model's context)")

        stream = ReplyStream(self.backend, prompt.ids, self.params, self.generator, prompt.stop_strings)
        interactive = self.conversational and self.out.isatty()
        column = 0  # where the reply starts on its line
        if interactive:
            print(self.style.model(f"{self.label}:") + " ", end="", file=self.out, flush=True)
            column = len(self.label) + 2
        show = self.for_screen(column)
        try:
            for piece in stream:
                if self.options.stream:
                    print(show(piece), end="", file=self.out, flush=True)
        except KeyboardInterrupt:
            stream.finish = "interrupted"
        except ChatError as why:  # said in words the user can act on, e.g. a full context or NaN scores
            print(file=self.out)
            self.error(str(why))
            return False
        except Exception as why:  # a failing model must not end the session
            print(file=self.out)
            self.error(f"the model failed: {why}" + ("" if self.options.verbose else " (--verbose shows more)"))
            if self.options.verbose:
                import traceback

                traceback.print_exc(file=self.err)
            return False
        if not self.options.stream:
            print(show(stream.text), end="", file=self.out)
        print(file=self.out, flush=True)

        extra = {"interrupted": True} if stream.finish == "interrupted" else {}
        self.conversation.add("assistant", stream.text, **extra)
        self.last_stats = stream.stats
        if stream.finish == "interrupted":
            self.notice("(interrupted; the partial reply is kept)")
        elif stream.finish == "length" and interactive:
            self.notice(f"(stopped at {stream.stats.new_tokens} tokens; !set max_new_tokens=N allows more)")
        if self.options.verbose:
            print(stream.stats.line(), file=self.err, flush=True)
        return True

    def for_screen(self, column: int) -> Callable[[str], str]:
        """What a reply's text goes through on its way out: on a terminal, no control characters, and a word
        wrap (but for --no-wrap and dumb terminals); to a pipe or file, nothing."""
        if not self.out.isatty():
            return str
        if not self.options.wrap or os.environ.get("TERM") == "dumb":
            return printable
        return WordWrap(columns(self.out), column=column)

    def handle(self, text: str) -> None:
        """One line (or block) of input: a command, a message, or nothing."""
        from chat.commands import run_command

        if not text.strip():
            return
        if text.lstrip().startswith("!"):
            run_command(self, text.strip())
        else:
            self.ask(text)


def show_notes(session: Session) -> None:
    for note in session.backend.info.notes:
        session.notice(note)


def run(options: Options) -> int:
    from chat.loading import SessionLoad, load_session

    if not options.verbose:
        # Library deprecation chatter (TorchScript, transformers) is for developers, not chat users.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
    if options.prompt is None and is_interactive():
        background = not options.verbose
        source = None
        if background and not Path(options.model).expanduser().is_dir():
            from chat.backends.base import LoadOptions
            from chat.backends.hub import locate_model

            # A Hub model: found in the cache (or downloaded, its progress shown) before the prompt.
            source = str(locate_model(LoadOptions(model=options.model, offline=options.offline)))
        if background and options.load is not None:  # a bad --load file stops the chat before its prompt
            storage.load(options.load, GenerationParams())
        load = SessionLoad(options, background=background, source=source)
        code = interactive(options, load)
        if load.loading:  # left before the model was in: a normal exit would wait for the load thread
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        load.close()
        return code
    session = load_session(options)
    show_notes(session)
    # Without a terminal only a chat resumed with --continue is kept (`chat --continue --prompt "and then?"`
    # goes on in its file); a one-shot question or a pipe of its own leaves no file behind.
    resumed = session.owns_file
    try:
        if options.prompt is not None:
            answered = session.ask(options.prompt)
            if resumed:
                session.keep()
            return 0 if answered else 1
        for message in piped_messages(sys.stdin):
            session.handle(message)
            if resumed:
                session.keep()
            if not session.running:
                break
        return 0
    finally:
        session.backend.close()


def interactive(options: Options, load: SessionLoad) -> int:
    save_history = setup_readline()
    try:
        with keys_kept_between_prompts(sys.stdin, sys.stdout) as read:
            converse(options, load, read)
    finally:
        save_history()
    return 0


def converse(options: Options, load: SessionLoad, read: Callable[[str], str]) -> None:
    """The prompt loop, until !exit or Ctrl+D; read is what reads a line at the prompt."""
    from chat.commands import command_name, help_text

    style = Style(sys.stdout)

    def notice(text: str) -> None:  # as Session.notice, also before there is a session
        print(style.note(text), file=sys.stderr, flush=True)

    label = model_label(options.model)
    session: Session | None = None
    if load.loading:
        intro = f"chat · {label} · "
    else:
        session = load.session(lambda _: None)
        session.conversational = True
        show_notes(session)
        info = session.backend.info
        intro = f"chat · {label} · {info.name} on {info.device} ({info.runs_on}) · "
    print(style.note(intro + '!help for commands, """ for multi-line, Ctrl+D to quit'), flush=True)
    if options.load is not None:
        notice(f"(resuming the chat in {options.load})")
    prompt = style.user(f"{options.user}:") + " "
    more = style.user("...") + " "
    while session is None or session.running:
        try:
            text = read_message(prompt, more, read)
        except KeyboardInterrupt:
            print()
            notice("(Ctrl+D or !exit to quit)")
            continue
        except EOFError:
            print()
            break
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
                session = _ready(load, notice)
            except KeyboardInterrupt:
                print()
                notice("(not sent: the model is still loading; Up brings the message back)")
                continue
        session.handle(text)
        session.keep()
    if session is not None and session.wrote:
        notice(f"(kept in {session.options.keep_in}; chat --continue resumes it)")


def _ready(load: SessionLoad, notice: Callable[[str], None]) -> Session:
    """The session once loaded in the background, told to the person in one line with what runs it."""
    session = load.session(notice)
    session.conversational = True
    info = session.backend.info
    session.notice(f"({info.name} on {info.device}, {info.runs_on})")
    show_notes(session)
    return session
