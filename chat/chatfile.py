"""The file a chat keeps itself in as it goes (autosave): which file, whether it is this chat's own, whether
it is up to date, and what happens when another chat writes the same file."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chat import conversation as storage
from chat.errors import ChatError

Signature = tuple[int, int, int, int]  # a file's device, inode, mtime and size: it changes with each write


def signature(path: Path) -> Signature | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """The save directory locked against other chats while one checks and writes its file (where the file
    system has no locks, the check still runs, unlocked)."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def free_name(path: Path) -> Path:
    """path, or path-2, path-3, ...: the first name no file has (another chat started the same second)."""
    candidate = path
    for number in itertools.count(2):
        if not candidate.exists():
            return candidate
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    raise AssertionError("unreachable")


def writable_problem(directory: Path) -> str | None:
    """Why no file can be written in directory (made if missing), or None."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as why:
        return f"cannot write in {directory}: {why.strerror or why}"
    return None


class ChatFile:
    """Where a chat is kept after each change, so a closed window or a forgotten !save loses nothing.

    The file always holds the chat as it is: an emptied chat (!undo of the last exchange, !clear) deletes
    it. A new chat takes a free name at its first write. If another chat wrote the file since this one read
    or wrote it (two terminals on one chat), this chat goes on in a new file, so neither loses a turn."""

    def __init__(self, path: Path | None, owned: bool = False):
        self.path = path  # None: autosave is off
        self.owned = owned  # the file is this chat's: resumed (--continue), or written by this run
        self.written = False  # this run wrote the file, and it holds the chat as it is
        self.kept: str | None = None  # the chat as last written (or as it began), as JSON text
        self.failure: str | None = None  # why the last write failed; the next change tries again
        self.saved: str | None = None  # the chat as !save last wrote it, anywhere
        self.seen = signature(path) if path is not None and owned else None  # the file as last read or written

    @property
    def on(self) -> bool:
        return self.path is not None

    def begin(self, record: dict[str, Any]) -> None:
        """The chat as it starts (a resumed one is on disk already): nothing to write until it changes."""
        self.kept = json.dumps(record)

    def changed(self, record: dict[str, Any]) -> bool:
        return self.on and json.dumps(record) != self.kept

    def keep(self, record: dict[str, Any], empty: bool) -> str | None:
        """Write the chat (or delete its file when it is empty); return a line to tell the user, if any.
        Raises ChatError when the file system refuses: the chat then counts as not on disk."""
        assert self.path is not None
        text = json.dumps(record)
        note = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as why:
            raise ChatError(f"cannot write in {self.path.parent}: {why.strerror or why}") from None
        with locked(self.path.parent):
            now = signature(self.path)
            if self.owned and now is not None and now != self.seen:
                other = self.path
                self.path, self.owned = storage.new_session_file(other.parent), False
                if not empty:
                    self.path = free_name(self.path)
                    note = f"({other} was changed by another chat; this one goes on in {self.path}, both are kept)"
            if empty:
                if self.owned and now is not None:
                    self._forget()
                self.seen, self.written = None, False
            else:
                if not self.owned:
                    self.path = free_name(self.path)
                storage.write(self.path, record, replace_any=self.owned)
                self.owned, self.written, self.seen = True, True, signature(self.path)
        self.kept, self.failure = text, None
        return note

    def _forget(self) -> None:
        assert self.path is not None
        try:
            self.path.unlink(missing_ok=True)
        except OSError as why:
            raise ChatError(f"cannot remove {self.path}: {why.strerror or why}") from None

    def own_path(self) -> Path:
        """The file !save without a path writes: this chat's own (a free name, before its first write)."""
        assert self.path is not None
        if not self.owned:
            self.path = free_name(self.path)
        return self.path

    def start_new(self, directory: Path) -> None:
        """Keep what follows in a file of its own (after !load: the chat before stays in its file)."""
        if self.on and self.owned:
            self.path, self.owned, self.written, self.seen = storage.new_session_file(directory), False, False, None

    def saved_to(self, path: Path, record: dict[str, Any]) -> None:
        """!save wrote the chat to path: if that is this chat's file, it is up to date now."""
        self.saved = json.dumps(record)
        if self.on and path.expanduser() == self.path:
            self.kept, self.owned, self.written, self.failure = self.saved, True, True, None
            self.seen = signature(self.path)

    def unsaved(self, record: dict[str, Any]) -> str | None:
        """Why the chat as it is now is on no disk, if it is not: autosave is on and its last write failed,
        and no !save wrote it since."""
        if not self.on or self.failure is None or json.dumps(record) in (self.kept, self.saved):
            return None
        return self.failure
