"""The chat session: one conversation with one loaded model, driven by a terminal, a pipe or --prompt."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from chat import conversation as storage
from chat.artifact import model_label
from chat.chatfile import ChatFile, writable_problem
from chat.conversation import Conversation
from chat.errors import ChatError
from chat.params import FLAG, LOADED, GenerationParams
from chat.prompt import Prompt, build_prompt, encode
from chat.signals import Closed, Signals
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
from chat.threads import ThreadTuner

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
        *,
        chat_file: ChatFile | None = None,
        param_sources: dict[str, str] | None = None,
    ):
        import torch

        self.backend = backend
        self.options = options
        self.conversation = conversation
        self.params = params
        # Where each parameter that is not chat's default came from ("command line", "!set", ...), for !status.
        self.param_sources = dict(param_sources or {})
        self.out, self.err = out, err
        self.style = Style(out)
        self.label = model_label(options.model)
        self.last_stats: ReplyStats | None = None
        self.running = True
        self.conversational = False  # a person at a terminal: label replies, remark on cut-off ones
        self.signals = Signals()
        self.generator = torch.Generator(device=backend.info.device)
        self.tuner = ThreadTuner(backend.info)  # torch's thread count follows other programs' use of the CPUs
        self.reseed()
        self.chat_file = chat_file or ChatFile(None)  # autosave: off unless the caller hands a file
        self.chat_file.begin(self.record())

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

    def record(self) -> dict[str, Any]:
        info = self.backend.info
        return storage.record(self.conversation, self.params, model=info.model, backend=info.name)

    def save(self, path: Path, replace_any: bool = False) -> None:
        record = self.record()
        storage.write(path, record, replace_any=replace_any or path.expanduser() == self.chat_file.path)
        self.chat_file.saved_to(path, record)

    def keep(self) -> None:
        """Write the chat to its file if it changed since (see ChatFile). A failure is said once; each later
        change tries again, and a write that works again says so."""
        file = self.chat_file
        record = self.record()
        if not file.changed(record):
            return
        failed_before = file.failure is not None
        try:
            note = file.keep(record, empty=not self.conversation.messages)
        except ChatError as why:
            if file.failure is None:
                self.error(f"{why}; this chat is not on disk: chat tries again after the next change (!save PATH)")
            file.failure = str(why)
            return
        if note:
            self.notice(note)
        elif failed_before and file.written:
            self.notice(f"(kept in {file.path} again)")

    def unsaved(self) -> str | None:
        """Why the chat's latest changes are on no disk, if they are not (see ChatFile.unsaved)."""
        return self.chat_file.unsaved(self.record())

    def load(self, path: Path) -> None:
        """Go on with a saved chat; its parameters apply, but those given on the command line still win."""
        conversation, params = storage.load(path, self.params)
        given = {key: getattr(self.params, key) for key, source in self.param_sources.items() if source == FLAG}
        params = params.replace(**given)
        for key, value in params.as_dict().items():
            if value != getattr(self.params, key):
                self.param_sources[key] = LOADED
        self.conversation = conversation
        self.set_params(params)

    def warm_up(self) -> None:
        """Do what a first reply would wait for, while the person is still typing: the chat template's first
        render, the tokenizer's first calls, and the model's first runs (TorchScript sets its graphs up on the
        first call: 40 of the 78 ms of a first 37-token prefill on 2 cores). The prompt's start, which the
        first message will share (the system prompt, or a resumed conversation), stays in the model's cache."""
        messages = [*self.conversation.in_context(), {"role": "user", "content": ""}]
        with contextlib.suppress(Exception):  # a failure shows, in words, when the first message meets it
            ids = encode(self.backend.tokenizer, messages, self.options.user)
            if len(ids) < self.backend.info.context_length:  # a long reply is capped, not refused
                self.backend.decode(int(self.backend.prefill(ids).argmax()))

    # --- replies ------------------------------------------------------------------------------

    def ask(self, text: str) -> bool:
        """Send a user message and stream the reply; False when no reply could be made (the message is taken
        back, so a refused message does not haunt the next turn)."""
        self.conversation.add("user", text)
        self.keep()  # the question is on disk before its reply starts
        if self.respond():
            return True
        self.conversation.messages.pop()
        return False

    def respond(self) -> bool:
        """Answer the last user message; False (and the history unchanged) when no reply could be made."""
        try:
            prompt = build_prompt(
                self.backend.tokenizer,
                self.conversation,
                context_length=self.backend.info.context_length,
                max_new_tokens=self.params.max_new_tokens,
                min_new_tokens=self.params.min_new_tokens,
                policy=self.options.context_policy,
                user_label=self.options.user,
            )
        except ChatError as why:
            self.error(str(why))
            return False
        if prompt.dropped:
            self.notice(f"(dropped the {prompt.dropped} oldest exchange(s) to fit the model's context)")
        if prompt.reply_room < self.params.max_new_tokens:
            self.notice(
                f"(this reply can be at most {prompt.reply_room} tokens: the prompt fills the rest of the model's "
                f"{self.backend.info.context_length}-token context)"
            )

        with self.signals.reply():  # from here to the reply's place in the history, a signal only stops it
            return self.reply_to(prompt)

    def reply_to(self, prompt: Prompt) -> bool:
        """Stream the reply to prompt and add it to the history; False (nothing added) when it failed."""
        from chat.generation import ReplyStream

        stream = ReplyStream(
            self.backend,
            prompt.ids,
            self.params,
            self.generator,
            prompt.stop_strings,
            signals=self.signals,
            tuner=self.tuner,
        )
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
        except KeyboardInterrupt:  # a second Ctrl+C in a slow step, or one during the prompt's prefill
            stream.finish = "interrupted"
        except ChatError as why:  # said in words the user can act on, e.g. a full context or NaN scores
            print(file=self.out)
            self.error(str(why))
            return False
        except Exception as why:  # a failing model must not end the session
            if "KeyboardInterrupt" in str(why):  # Ctrl+C inside a Python op, as TorchScript passes it on
                stream.finish = "interrupted"
            else:
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
        if stream.finish == "interrupted" and self.signals.closing is None:
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

    def handle(self, text: str) -> bool:
        """One line (or block) of input: a command, a message, or nothing; False when it failed (a command's
        error, or a message that got no reply)."""
        from chat.commands import run_command

        text = text.strip()
        if not text:
            return True
        if text.startswith("!!"):  # a message that starts with "!"
            return self.ask(text[1:])
        if text.startswith("!"):
            return run_command(self, text)
        return self.ask(text)


def show_notes(session: Session) -> None:
    for note in session.backend.info.notes:
        session.notice(note)


def run(options: Options) -> int:
    from chat.loading import SessionLoad, load_session, prepare_model

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
    source = prepare_model(options, locate=background or options.export)
    if at_terminal:
        load = SessionLoad(options, background=background, source=source)
        code = interactive(options, load, signals)
        if load.loading:  # left before the model was in: a normal exit would wait for the load thread
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        load.close()
        return code
    # Without a terminal only a chat resumed with --continue is kept (`chat --continue --prompt "and then?"`
    # goes on in its file); a one-shot question or a pipe of its own leaves no file behind.
    session = load_session(options, keep=options.keep_in is not None and options.keep_in == options.load, source=source)
    session.signals = signals
    show_notes(session)
    failed = False
    try:
        messages = [options.prompt] if options.prompt is not None else piped_messages(sys.stdin)
        for message in messages:
            failed |= not session.handle(message)
            session.keep()
            if not session.running or signals.closing:
                break
    except Closed:
        session.keep()
    finally:
        session.backend.close()
    if signals.closing:
        return signals.exit_code
    return 1 if failed or session.unsaved() else 0


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
    from chat.commands import command_name, help_text

    style = Style(sys.stdout)

    def notice(text: str) -> None:  # as Session.notice, also before there is a session
        print(style.note(text), file=sys.stderr, flush=True)

    label = model_label(options.model)
    not_writable = writable_problem(options.keep_in.parent) if options.keep_in is not None else None
    session: Session | None = None
    if load.loading:
        intro = f"chat · {label} · "
    else:
        session = _ready(load, notice, signals, not_writable, announce=False)
        info = session.backend.info
        intro = f"chat · {label} · {info.name} on {info.device} ({info.runs_on}) · "
    print(style.note(intro + '!help for commands, """ for multi-line, Ctrl+D to quit'), flush=True)
    if options.load is not None:
        notice(f"(resuming the chat in {options.load})")
    if not_writable:
        notice(f"({not_writable}: this chat is not kept on disk; chat tries again after each change, !save PATH)")
    prompt = style.user(f"{options.user}:") + " "
    more = style.user("...") + " "
    warned = False  # about leaving with changes not on disk
    try:
        while True:
            try:
                text = read_message(prompt, more, read)
            except KeyboardInterrupt:
                print()
                notice("(Ctrl+D or !exit to quit)")
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
                    session = _ready(load, notice, signals, not_writable)
                except KeyboardInterrupt:
                    print()
                    notice("(not sent: the model is still loading; Up brings the message back)")
                    continue
            try:
                session.handle(text)
            except KeyboardInterrupt:  # outside a reply (a command, the prompt being built): stop that only
                print()
                notice("(interrupted)")
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
        notice(f"(kept in {session.chat_file.path}; chat --continue resumes it)")


def _ready(
    load: SessionLoad, notice: Callable[[str], None], signals: Signals, not_writable: str | None, announce: bool = True
) -> Session:
    """The session once loaded (in the background), told to the person in one line with what runs it.
    not_writable: why the save directory took no file at start (said then, so not again at the first write)."""
    session = load.session(notice)
    session.conversational = True
    session.signals = signals
    session.chat_file.failure = not_writable
    if announce:
        info = session.backend.info
        session.notice(f"({info.name} on {info.device}, {info.runs_on})")
    show_notes(session)
    return session
