"""The chat session: one conversation with one loaded model, driven by a terminal, a pipe or --prompt."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from chat import conversation as storage
from chat.conversation import Conversation
from chat.errors import ChatError
from chat.params import GenerationParams, model_recommendations
from chat.prompt import build_prompt, encode
from chat.terminal import Style, is_interactive, piped_messages, quiet_typing, read_message, setup_readline

if TYPE_CHECKING:
    from chat.backends.base import Backend
    from chat.cli import Options
    from chat.generation import ReplyStats


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

    def save(self, path: Path) -> None:
        info = self.backend.info
        storage.save(path, self.conversation, self.params, model=info.model, backend=info.name)

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
        if interactive:
            print(self.style.model(f"{self.label}:") + " ", end="", file=self.out, flush=True)
        try:
            with quiet_typing(sys.stdin) if interactive else contextlib.nullcontext():
                for piece in stream:
                    if self.options.stream:
                        print(piece, end="", file=self.out, flush=True)
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
            print(stream.text, end="", file=self.out)
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

    def handle(self, text: str) -> None:
        """One line (or block) of input: a command, a message, or nothing."""
        from chat.commands import run_command

        if not text.strip():
            return
        if text.lstrip().startswith("!"):
            run_command(self, text.strip())
        else:
            self.ask(text)


def load_session(options: Options, announce: bool = True, source: str | None = None) -> Session:
    """Load the model and make the session (its notes, e.g. why auto fell back, are for the caller to show).

    source: the local directory options.model was resolved to (a Hub snapshot), if that is done already."""
    from chat.backends.base import LoadOptions
    from chat.backends.select import load_backend

    conversation = Conversation(system=options.system)
    if announce and sys.stderr.isatty():
        print(f"loading {options.model} ...", file=sys.stderr, flush=True)
    load = LoadOptions(
        model=source or options.model,
        device=options.device,
        dtype=options.dtype,
        threads=options.threads,
        offline=options.offline,
        trust_remote_code=options.trust_remote_code,
    )
    backend = load_backend(load, options.backend)
    backend.info.model = options.model  # the name the user gave, for !status and saved sessions
    # Ours, then what the model recommends, then what the user typed.
    params = GenerationParams(**model_recommendations(backend.info.path)).replace(**options.param_changes)
    if options.load is not None:  # a resumed session brings its own parameters and history
        conversation, params = storage.load(options.load, params)
        if options.system is not None:
            conversation.system = options.system
    return Session(backend, options, conversation, params)


def show_notes(session: Session) -> None:
    for note in session.backend.info.notes:
        session.notice(note)


class SessionLoad:
    """The model loading for an interactive chat: in a thread while the person types their first message,
    so the prompt shows at once (loading takes seconds, most of them importing torch and reading weights).

    A Hub model is found (or downloaded, with progress) in the foreground first, and `source` names its
    local snapshot; --verbose keeps the plain order for debugging. If the load fails, the main thread is
    interrupted at the prompt (SIGUSR1, like Ctrl+C for readline), so the error shows at once rather than
    after a message."""

    def __init__(self, options: Options, background: bool, source: str | None = None):
        self.options = options
        self._session: Session | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._handover = background  # the main thread has yet to take the session over (see session())
        self._alert = background and hasattr(signal, "pthread_kill")  # not on Windows
        self._source = source
        if not background:
            self._session = load_session(options, source=source)
            self._done.set()
            return
        if self._alert:
            self._previous = signal.signal(signal.SIGUSR1, self._on_failure)
        self._thread = threading.Thread(target=self._load, name="chat-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self._session = load_session(self.options, announce=False, source=self._source)
            self._session.warm_up()
        except BaseException as why:  # handed to the main thread as it is
            self._error = why
        self._done.set()
        if self._error is not None and self._alert:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def _on_failure(self, signum: int, frame: object) -> None:
        if self._error is None:
            return
        try:  # a message half typed goes into the input history: Up brings it back next time
            import readline

            if readline.get_line_buffer().strip():
                readline.add_history(readline.get_line_buffer())
        except ImportError:
            pass
        print(file=sys.stderr)
        raise self._error

    @property
    def loading(self) -> bool:
        return not self._done.is_set()

    def close(self) -> None:
        if self._session is not None:
            self._session.backend.close()

    def session(self, notice: Callable[[str], None]) -> Session:
        """The loaded session, waiting for it (with a notice) if need be; raises what the load raised."""
        if not self._done.is_set():
            notice("(loading the model ...)")
            self._done.wait()
        if self._error is not None:
            raise self._error
        session = self._session
        assert session is not None
        if self._handover:  # each step may be redone if a Ctrl+C cuts in
            import torch

            # The thread count is per OpenMP thread: the load thread's setting does not reach this one.
            torch.set_num_threads(session.backend.info.threads)
            if self._alert:
                signal.signal(signal.SIGUSR1, self._previous)
            self._handover = False
        return session


def run(options: Options) -> int:
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
    try:
        if options.prompt is not None:
            return 0 if session.ask(options.prompt) else 1
        for message in piped_messages(sys.stdin):
            session.handle(message)
            if not session.running:
                break
        return 0
    finally:
        session.backend.close()


def interactive(options: Options, load: SessionLoad) -> int:
    from chat.commands import command_name, help_text

    save_history = setup_readline()
    style = Style(sys.stdout)
    label = model_label(options.model)
    session: Session | None = None
    if load.loading:
        intro = f"chat · {label} · "
    else:
        session = load.session(lambda _: None)
        session.conversational = True
        show_notes(session)
        info = session.backend.info
        intro = f"chat · {label} · {info.name} on {info.device} ({info.dtype}) · "
    print(style.note(intro + '!help for commands, """ for multi-line, Ctrl+D to quit'), flush=True)
    prompt = style.user(f"{options.user}:") + " "
    more = style.user("...") + " "
    try:
        while session is None or session.running:
            try:
                text = read_message(prompt, more)
            except KeyboardInterrupt:
                print()
                print(style.note("(Ctrl+D or !exit to quit)"), file=sys.stderr, flush=True)
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
                    session = _ready(load, style)
                except KeyboardInterrupt:
                    print()
                    print(
                        style.note("(not sent: the model is still loading; Up brings the message back)"),
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
            session.handle(text)
    finally:
        save_history()
    return 0


def _ready(load: SessionLoad, style: Style) -> Session:
    """The session once loaded in the background, told to the person in one line with what runs it."""
    session = load.session(lambda text: print(style.note(text), file=sys.stderr, flush=True))
    session.conversational = True
    info = session.backend.info
    session.notice(f"({info.name} on {info.device}, {info.dtype})")
    show_notes(session)
    return session


def model_label(model: str) -> str:
    return Path(model.rstrip("/")).name or model
