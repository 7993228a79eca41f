"""Errors that reach the user as one line, never as a traceback."""


class ChatError(Exception):
    """A failure the user can fix; its message says how. Exit code 1."""

    exit_code = 1


class UsageError(ChatError):
    """A bad command line or value. Exit code 2."""

    exit_code = 2


def file_error(why: OSError) -> str:
    """An OSError the file system raised for a path the user gave, in a line: what, and which path (a path too
    long to read is cut in the middle)."""
    name = str(why.filename) if why.filename is not None else ""
    if len(name) > 80:
        name = f"{name[:40]}...{name[-30:]}"
    return f"{why.strerror or why}: {name}" if name else str(why.strerror or why)
