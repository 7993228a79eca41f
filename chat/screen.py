"""What chat writes on the screen: replies (printable, wrapped between words), notices and errors, in colour on
a terminal. Everything the chat shows goes through a Screen."""

from __future__ import annotations

import os
import re
import shutil
import sys
import unicodedata
from collections.abc import Callable
from typing import TextIO

from chat.engine import Reasoning


class Style:
    """ANSI colour when writing to a terminal and NO_COLOR is unset (https://no-color.org)."""

    def __init__(self, stream: TextIO):
        self.enabled = stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"

    def _wrap(self, code: str, text: str, prompt: bool) -> str:
        if not self.enabled:
            return text
        start, end = f"\033[{code}m", "\033[0m"
        if prompt:  # tell readline the codes take no room, or line editing goes wrong
            start, end = f"\001{start}\002", f"\001{end}\002"
        return f"{start}{text}{end}"

    def user(self, text: str) -> str:
        return self._wrap("1;32", text, prompt=True)

    def model(self, text: str) -> str:
        return self._wrap("1;36", text, prompt=False)

    def note(self, text: str) -> str:
        return self._wrap("2", text, prompt=False)

    def error(self, text: str) -> str:
        return self._wrap("31", text, prompt=False)


def columns(screen: TextIO) -> int:
    """The terminal's width, read anew for each reply so a resized window is followed."""
    try:
        return os.get_terminal_size(screen.fileno()).columns
    except (AttributeError, ValueError, OSError):  # not a real terminal (a test's StringIO): $COLUMNS or 80
        return shutil.get_terminal_size().columns


# Control characters but newline and tab: a model's reply must not move the cursor or send the terminal
# escape sequences. A carriage return is dropped ("\r\n" ends a line as "\n" does); the others show as U+FFFD.
CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """A reply as it may be written to a terminal."""
    return CONTROLS.sub("\ufffd", text.replace("\r", ""))


def char_width(char: str) -> int:
    """Columns a character takes on a terminal: 2 for wide East Asian forms, 0 for combining marks and controls."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Cc", "Cf", "Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


class WordWrap:
    """A streamed reply wrapped at word boundaries, with no delay: each piece is written as it comes, and a
    word that grows past the edge is erased (backspaces, then erase to end of line) and written again on
    the next line. Only the reply on screen is wrapped, never the text kept in the chat.

    The last column stays empty: a cursor after a write there waits in the terminal's "pending wrap"
    state, where a backspace lands differently from one terminal to another."""

    def __init__(self, width: int, column: int = 0):
        self.limit = max(width - 1, 8)  # a window narrower than a short word wraps anyhow
        self.column = column  # where the cursor is, e.g. after the "model:" label
        self.word = ""  # the word being written: already on screen, at the end of the line

    def __call__(self, text: str) -> str:
        out: list[str] = []
        for char in printable(text):
            if char == "\n":
                self.column, self.word = 0, ""
                out.append(char)
                continue
            width = 8 - self.column % 8 if char == "\t" else char_width(char)
            if char.isspace():
                self.word = ""
                if self.column + width > self.limit:  # a space at the edge becomes the line break
                    self.column = 0
                    out.append("\n")
                    continue
            elif self.column + width > self.limit:
                moved = sum(map(char_width, self.word))
                if 0 < moved < self.column and moved + width <= self.limit:  # it fits on a line: move it there
                    out.append("\b" * moved + "\033[K\n" + self.word)
                    self.column = moved
                else:  # the word is longer than a line, or at its start already: break it
                    out.append("\n")
                    self.column, self.word = 0, ""
            if not char.isspace():
                self.word += char
            out.append(char)
            self.column += width
        return "".join(out)


class Screen:
    """Where the chat writes: replies and command output to `out`, remarks and errors to `err` (so a piped
    stdout holds the replies alone). wrap: break replies between words on a terminal (not --no-wrap)."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, wrap: bool = True):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.style = Style(self.out)
        self.wrap = wrap

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def notice(self, text: str) -> None:
        """A remark about the session, not part of a reply."""
        print(self.style.note(text), file=self.err, flush=True)

    def error(self, text: str) -> None:
        print(self.style.error(f"error: {text}"), file=self.err, flush=True)

    def at_terminal(self) -> bool:
        return self.out.isatty()

    def reply(self, label: str | None, stream: bool, reasoning: bool = True) -> ReplyOnScreen:
        """A reply about to be written: after its label when given (a person at a terminal)."""
        return ReplyOnScreen(self, label, stream, reasoning)


class ReplyOnScreen:
    """One reply on its way out: piece by piece (or whole at the end, without streaming). On a terminal no
    control characters reach the screen and lines break between words (but for --no-wrap and dumb terminals);
    to a pipe or file the text goes as it is. Reasoning pieces are dimmed, or left out."""

    def __init__(self, screen: Screen, label: str | None, stream: bool, reasoning: bool):
        self.screen, self.stream, self.reasoning = screen, stream, reasoning
        out = screen.out
        column = 0
        if label is not None:
            print(screen.style.model(f"{label}:") + " ", end="", file=out, flush=True)
            column = len(label) + 2
        self.show: Callable[[str], str] = str
        if out.isatty():
            wrap = screen.wrap and os.environ.get("TERM") != "dumb"
            self.show = WordWrap(columns(out), column=column) if wrap else printable

    def write(self, piece: str) -> None:
        if isinstance(piece, Reasoning):
            if self.reasoning and self.stream:
                print(self.screen.style.note(self.show(piece)), end="", file=self.screen.out, flush=True)
            return
        if self.stream:
            print(self.show(piece), end="", file=self.screen.out, flush=True)

    def cut(self) -> None:
        """The reply failed: end its line, show nothing more of it."""
        print(file=self.screen.out, flush=True)

    def end(self, text: str) -> None:
        """The reply is done: without streaming, its whole text (the reply's own, reasoning left out) goes now."""
        if not self.stream:
            print(self.show(text), end="", file=self.screen.out)
        print(file=self.screen.out, flush=True)
