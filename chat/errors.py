"""Errors that reach the user as one line, never as a traceback."""


class ChatError(Exception):
    """A failure the user can fix; its message says how. Exit code 1."""

    exit_code = 1


class UsageError(ChatError):
    """A bad command line or value. Exit code 2."""

    exit_code = 2
