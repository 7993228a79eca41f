"""How Ctrl+C, a closed window (SIGHUP) and SIGTERM reach the chat.

During a reply a signal only sets a flag that the generation loop reads before each token: the reply stops
between two tokens on every backend and kernel path (an exception raised inside a TorchScript op would come
out as a RuntimeError, and could leave a cache half written). A second Ctrl+C while a step is still running,
or one during a step that may take long (the prompt's prefill, waiting on a server), interrupts at once.
Between replies Ctrl+C is a KeyboardInterrupt as usual, and SIGHUP or SIGTERM raise Closed, so the prompt
loop can write the chat before leaving.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

CLOSING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Closed(BaseException):
    """The window was closed or the process told to end: write what must be kept, then leave.
    A BaseException, as KeyboardInterrupt is, so that no `except Exception` takes it for a failure."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    def __init__(self) -> None:
        self.stop = False  # the reply being written should end before its next token
        self.closing: int | None = None  # the signal that asked the process to end, once one has
        self.blocking = False  # in a step that may take long (a prefill, a server's answer): Ctrl+C ends it
        self._in_reply = False
        self._installed = False

    def install(self) -> None:
        """Take SIGTERM and SIGHUP (Python can only handle signals in its main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in CLOSING:
            signal.signal(signum, self._on_close)
        self._installed = True

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal: 128 + its number."""
        return 128 + (self.closing or 0)

    @contextlib.contextmanager
    def reply(self) -> Iterator[None]:
        """While a reply is written: Ctrl+C (and a closing signal) ask it to stop."""
        self.stop, self._in_reply = self.closing is not None, True
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_interrupt) if main else None
        try:
            yield
        finally:
            self._in_reply, self.blocking = False, False
            if main:
                signal.signal(signal.SIGINT, previous)

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.stop or self.blocking:
            raise KeyboardInterrupt
        self.stop = True

    def _on_close(self, signum: int, frame: FrameType | None) -> None:
        if self.closing is not None:  # leaving already (readline passes a hang-up on once more): let it finish
            return
        if signum == getattr(signal, "SIGHUP", None):
            _detach_terminal()
        self.closing = signum
        if self._in_reply:
            self.stop = True
        else:
            raise Closed(signum)


def _detach_terminal() -> None:
    """The terminal is gone: writing to it would fail (EIO), so what is still said goes nowhere."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
