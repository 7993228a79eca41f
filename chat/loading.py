"""Loading the model for a session: in the foreground, or in a thread behind the interactive chat's prompt."""

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
from chat.params import FLAG, LOADED, RECOMMENDED, GenerationParams, model_recommendations
from chat.session import Session
from chat.terminal import Style

if TYPE_CHECKING:
    from chat.backends.base import LoadOptions
    from chat.cli import Options


def load_session(options: Options, *, keep: bool, announce: bool = True, source: str | None = None) -> Session:
    """Load the model and make the session (its notes, e.g. why auto fell back, are for the caller to show).

    keep: the chat keeps itself in options.keep_in as it goes (a chat at a terminal, or one resumed with
    --continue). source: the local directory options.model was resolved to (a Hub snapshot), if that is
    done already."""
    from chat.backends.select import load_backend

    conversation = Conversation(system=options.system)
    if announce and sys.stderr.isatty():
        print(f"loading {options.model} ...", file=sys.stderr, flush=True)
    backend = load_backend(load_options(options, source or options.model), options.backend)
    backend.info.model = options.model  # the name the user gave, for !status and saved sessions
    # Ours, then what the model recommends, then a resumed chat's, then what the user typed.
    recommended = model_recommendations(backend.info.path)
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
    return Session(backend, options, conversation, params, chat_file=chat_file, param_sources=sources)


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


def prepare_model(options: Options, locate: bool) -> str | None:
    """In the foreground, before the model loads: find (or download, with progress) a Hub model when `locate`,
    then export it on first use where auto would run it on transformers. Returns the model's local path when
    it was located (a Hub snapshot), else None."""
    from chat.backends.base import LoadOptions

    source = None
    if locate and not Path(options.model).expanduser().is_dir():
        from chat.backends.hub import locate_model

        source = str(locate_model(LoadOptions(model=options.model, offline=options.offline)))
    if options.export:
        from chat.auto_export import export_if_needed

        style = Style(sys.stderr)
        model = source or options.model

        def say(text: str) -> None:
            print(style.note(text), file=sys.stderr, flush=True)

        export_if_needed(load_options(options, model), Path(model).expanduser(), say, progress=sys.stderr.isatty())
    return source


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
        self._error_raised = False  # by session() or the alert: a late alert then stays quiet
        self._done = threading.Event()
        self._handover = background  # the main thread has yet to take the session over (see session())
        self._alert = background and hasattr(signal, "pthread_kill")  # not on Windows
        self._source = source
        if not background:
            self._session = load_session(options, keep=True, source=source)
            self._done.set()
            return
        if self._alert:
            self._previous = signal.signal(signal.SIGUSR1, self._on_failure)
        self._thread = threading.Thread(target=self._load, name="chat-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self._session = load_session(self.options, keep=True, announce=False, source=self._source)
            self._session.warm_up()
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
            self._session.backend.close()

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
            import torch

            # The thread count is per OpenMP thread: the load thread's setting does not reach this one.
            torch.set_num_threads(session.backend.info.threads)
            if self._alert:
                signal.signal(signal.SIGUSR1, self._previous)
            self._handover = False
        return session
