"""The keyboard side of the terminal: line editing with readline, reading one (possibly multi-line) message,
keys typed between prompts, and composing a message in an editor. What is written goes through chat.screen."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from chat.errors import ChatError
from chat.text import readable

MULTILINE = '"""'


def history_file() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "chat" / "history"


def setup_readline() -> Callable[[], None]:
    """Line editing, bracketed paste (a pasted block stays one message) and a persistent input history.

    Returns the function that saves the history; call it on exit.
    """
    try:
        import readline
    except ImportError:  # no readline (some minimal builds): plain input() still works
        return lambda: None
    readline.parse_and_bind("set enable-bracketed-paste on")
    path = history_file()
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass  # a read-only home must not spoil the exit

    return save


def read_message(prompt: str, more: str, read: Callable[[str], str] = input) -> str:
    """One message: a line, or the lines between two lines of \"\"\"; bytes that are not UTF-8 become U+FFFD."""
    return readable(_read_block(prompt, more, read))


def _read_block(prompt: str, more: str, read: Callable[[str], str]) -> str:
    line = read(prompt)
    if line.strip() != MULTILINE:
        return line
    lines = []
    while True:
        try:
            line = read(more)
        except EOFError:
            if not lines:
                raise
            break  # the end of input ends the block too: what was typed is sent, not lost
        if line.strip() == MULTILINE:
            break
        lines.append(line)
    return "\n".join(lines)


def piped_messages(stream: TextIO) -> Iterator[str]:
    """Messages from a pipe: one a line, or a \"\"\" block; blank lines are skipped."""
    lines = (line.rstrip("\n") for line in stream)

    def read(_: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    while True:
        try:
            message = read_message("", "", read)
        except EOFError:
            return
        if message.strip():
            yield message


@contextlib.contextmanager
def keys_kept_between_prompts(keyboard: TextIO, screen: TextIO) -> Iterator[Callable[[str], str]]:
    """The terminal for a chat at a prompt; yields the function that reads a line at the prompt.

    Between prompts (a reply streaming, a command running, the model loading) the terminal neither echoes
    keys nor gathers them into lines: they wait as typed, and readline takes them at the next prompt. In the
    terminal's own line mode a Ctrl+D typed then would be dropped, and typing would be echoed into the reply.
    Ctrl+C still interrupts (signals stay on).
    """
    try:
        import readline
        import termios

        fd = keyboard.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError):  # not a terminal, no termios (Windows) or no readline
        yield input
        return
    # input() edits with readline only when both ends are a terminal; libedit's raw mode expects line mode
    if not screen.isatty() or "libedit" in (readline.__doc__ or ""):
        yield input
        return
    at_prompt = list(saved)
    at_prompt[3] &= ~termios.ICANON  # ECHO stays: readline looks at it to decide whether to show the typing
    at_prompt[6] = list(saved[6])
    at_prompt[6][termios.VMIN], at_prompt[6][termios.VTIME] = 1, 0
    busy = list(at_prompt)
    busy[3] &= ~termios.ECHO

    def read(prompt: str) -> str:
        termios.tcsetattr(fd, termios.TCSANOW, at_prompt)
        try:
            return input(prompt)
        finally:
            with contextlib.suppress(termios.error):  # the terminal may be gone (a hang-up)
                termios.tcsetattr(fd, termios.TCSANOW, busy)

    termios.tcsetattr(fd, termios.TCSANOW, busy)
    try:
        yield read
    finally:
        with contextlib.suppress(termios.error):  # the terminal may be gone (a hang-up)
            termios.tcsetattr(fd, termios.TCSANOW, saved)


def compose_in_editor(start: str) -> str:
    """A message written in the user's editor ($VISUAL, $EDITOR, else nano or vi), starting from `start`."""
    command = os.environ.get("VISUAL") or os.environ.get("EDITOR") or next(filter(shutil.which, ("nano", "vi")), None)
    if not command:
        raise ChatError("no editor found: set $EDITOR (for example: export EDITOR=nano)")
    try:
        argv = shlex.split(command)
    except ValueError as why:  # an unbalanced quote, say
        raise ChatError(f"cannot read the editor command `{command}` ({why}); fix $EDITOR") from None
    if not argv:
        raise ChatError("$EDITOR is empty; set it to an editor (for example: export EDITOR=nano)")
    # The editor has the terminal, Ctrl+C included: this process waits on, and the editor gets the
    # terminal's own line mode and echo back (see keys_kept_between_prompts).
    waiting = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        with tempfile.TemporaryDirectory(prefix="chat-") as folder, terminal_line_mode(sys.stdin):
            path = Path(folder) / "message.md"
            path.write_text(start, encoding="utf-8")
            finished = subprocess.run([*argv, str(path)], check=False)
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError as why:
        if why.filename == argv[0]:
            raise ChatError(f"no editor `{argv[0]}` here; set $EDITOR to one you have") from None
        raise ChatError(f"the message's file is gone ({why.strerror}); nothing was sent") from None
    except OSError as why:  # not executable, an unwritable $TMPDIR, ...
        raise ChatError(f"could not run the editor `{command}` ({why.strerror or why}); nothing was sent") from None
    finally:
        signal.signal(signal.SIGINT, waiting)
    if finished.returncode != 0:
        raise ChatError(f"the editor `{command}` exited with status {finished.returncode}; nothing was sent")
    return readable(text)


@contextlib.contextmanager
def terminal_line_mode(keyboard: TextIO) -> Iterator[None]:
    """The terminal in its usual line mode with echo for a while, then as it was."""
    try:
        import termios

        fd = keyboard.fileno()
        was = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError):
        yield
        return
    usual = list(was)
    usual[3] |= termios.ICANON | termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, usual)
    try:
        yield
    finally:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSANOW, was)


def is_interactive() -> bool:
    return sys.stdin.isatty()
