"""Making the session's engine ready: the model exported on first use, then loaded (or the server reached), in
the foreground or in a thread behind the interactive chat's prompt."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from chat import conversation as storage
from chat.chatfile import ChatFile
from chat.conversation import Conversation
from chat.engine import Engine
from chat.options import Options
from chat.params import FLAG, LOADED, RECOMMENDED, GenerationParams
from chat.screen import Screen
from chat.session import Session
from chat.source import ModelSource, resolve_model

if TYPE_CHECKING:
    from chat.backends.base import LoadOptions


def load_engine(options: Options, source: ModelSource) -> Engine:
    """The engine for the model: a server's (chat.remote), else the model loaded here (chat.local)."""
    if source.remote:
        from chat.remote import connect

        assert source.base_url is not None
        return connect(source.base_url, source.name or None, options.api_key, offline=options.local_only)
    from chat.backends.select import load_backend
    from chat.local import LocalEngine

    backend = load_backend(load_options(options, source.local), options.backend)
    backend.info.model = options.model  # the name the user gave, for !status and saved sessions
    return LocalEngine(backend, options.user)


def load_session(options: Options, source: ModelSource | None = None, *, keep: bool, announce: bool = True) -> Session:
    """Make the engine ready and the session (its notes, e.g. why auto fell back, are for the caller to show).

    keep: the chat keeps itself in options.keep_in as it goes (a chat at a terminal, or one resumed with
    --continue). source: the model resolved (chat.source); by default the options' model as named."""
    source = source or resolve_model(options, locate=False)
    conversation = Conversation(system=options.system)
    if announce and sys.stderr.isatty():
        print(
            f"{'connecting to' if source.remote else 'loading'} {options.model or source.base_url} ...",
            file=sys.stderr,
            flush=True,
        )
    engine = load_engine(options, source)
    # Ours, then what the model recommends, then a resumed chat's, then what the user typed.
    recommended = engine.recommended()
    params = GenerationParams(**recommended)
    sources = dict.fromkeys(recommended, RECOMMENDED)
    if options.load is not None:  # a resumed session brings its own parameters and history
        conversation, loaded = storage.load(options.load, params)
        sources.update({key: LOADED for key, value in loaded.as_dict().items() if value != getattr(params, key)})
        params = loaded
        if options.system is not None:
            conversation.system = options.system
    params = params.replace(**options.param_changes)
    sources.update(dict.fromkeys(options.param_changes, FLAG))
    chat_file = None
    if keep and options.keep_in is not None:
        chat_file = ChatFile(options.keep_in, owned=options.keep_in == options.load)
    return Session(engine, options, conversation, params, chat_file=chat_file, param_sources=sources)


def load_options(options: Options, model: str) -> LoadOptions:
    from chat.backends.base import LoadOptions

    return LoadOptions(
        model=model,
        device=options.device,
        dtype=options.dtype,
        quantize=options.quantize,
        first_use=options.export,
        threads=options.threads,
        offline=options.offline,
        trust_remote_code=options.trust_remote_code,
    )


def export_on_first_use(options: Options, source: ModelSource) -> None:
    """In the foreground, before the model loads: export it for chat's native core where auto would run it
    on transformers (chat.auto_export), with progress."""
    if not options.export or source.remote:
        return
    from chat.auto_export import export_if_needed

    screen = Screen(sys.stderr, sys.stderr)
    export_if_needed(
        load_options(options, source.local),
        Path(source.local).expanduser(),
        screen.notice,
        progress=sys.stderr.isatty(),
    )


class SessionLoad:
    """The engine made ready for an interactive chat: in a thread while the person types their first message,
    so the prompt shows at once (loading takes seconds, most of them importing torch and reading weights).

    A Hub model is found (or downloaded, with progress) in the foreground first (chat.source); --verbose keeps
    the plain order for debugging. If the load fails, the main thread is interrupted at the prompt (SIGUSR1,
    like Ctrl+C for readline), so the error shows at once rather than after a message."""

    def __init__(self, options: Options, background: bool, source: ModelSource | None = None):
        self.options = options
        self._source = source or resolve_model(options, locate=False)
        self._session: Session | None = None
        self._error: BaseException | None = None
        self._error_raised = False  # by session() or the alert: a late alert then stays quiet
        self._done = threading.Event()
        self._handover = background  # the main thread has yet to take the session over (see session())
        self._alert = background and hasattr(signal, "pthread_kill")  # not on Windows
        if not background:
            self._session = load_session(options, self._source, keep=True)
            self._done.set()
            return
        if self._alert:
            self._previous = signal.signal(signal.SIGUSR1, self._on_failure)
        self._thread = threading.Thread(target=self._load, name="chat-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self._session = load_session(self.options, self._source, keep=True, announce=False)
            self._session.engine.warm_up(self._session.conversation)
        except BaseException as why:  # handed to the main thread as it is
            self._error = why
        self._done.set()
        if self._error is not None and self._alert:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def _on_failure(self, signum: int, frame: object) -> None:
        if self._error is None or self._error_raised:
            return
        self._error_raised = True
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
            self._session.engine.close()

    def session(self, notice: Callable[[str], None]) -> Session:
        """The loaded session, waiting for it (with a notice) if need be; raises what the load raised."""
        if not self._done.is_set():
            notice("(loading the model ...)")
            self._done.wait()
        if self._error is not None:
            self._error_raised = True
            raise self._error
        session = self._session
        assert session is not None
        if self._handover:  # each step may be redone if a Ctrl+C cuts in
            session.engine.settle_thread()
            if self._alert:
                signal.signal(signal.SIGUSR1, self._previous)
            self._handover = False
        return session
