"""Reading a JSON file chat is given (a saved chat, a model's configs, an artifact's manifest) without trusting
it: whatever is wrong with the file is one line that names it and says what, never a traceback."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Any

from chat.errors import ChatError, file_error

MiB = 2**20
CHAT_MAX_BYTES = 256 * MiB  # a saved chat is text: even a very long one is a few MiB
# config.json, tokenizer_config.json, generation_config.json: a large vocabulary's added tokens make a few MiB.
MODEL_CONFIG_MAX_BYTES = 32 * MiB
MANIFEST_MAX_BYTES = 4 * MiB  # a TorchScript artifact's manifest: a few lines per file
# Real files nest a few levels. The parser, and anything that walks or prints what it built, recurses once
# per level: deeper data could end the program with a RecursionError far from here.
MAX_DEPTH = 100

_JSON_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true or false"}


class JSONFileError(ChatError):
    """A JSON file that cannot be used; reason: what is wrong in a few words, for a listing of files."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NoSuchFile(JSONFileError):
    """The file is not there (callers that have a better word for that, or a default, catch this)."""


def read_json(path: Path, what: str, max_bytes: int) -> dict[str, Any]:
    """The JSON object in path; what: the kind of file expected, as in "is not {what}" ("a saved chat")."""
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise JSONFileError(f"{path} is a directory, not {what}", "a directory")
        if not stat.S_ISREG(info.st_mode):  # a pipe or a device: reading could block, or never end
            raise JSONFileError(f"{path} is not a regular file (a pipe or a device, say)", "not a regular file")
        if info.st_size > max_bytes:
            raise _too_large(path, what, info.st_size, max_bytes)
        with path.open("rb") as file:
            raw = file.read(max_bytes + 1)  # it may have grown since the stat
    except FileNotFoundError:
        raise NoSuchFile(f"no file {path}", "missing") from None
    except PermissionError:
        raise JSONFileError(
            f"cannot read {path}: permission denied (check its permissions)", "permission denied"
        ) from None
    except OSError as why:
        raise JSONFileError(f"cannot read {what}: {file_error(why)}", str(why.strerror or why).lower()) from None
    except ValueError:  # a NUL in the path: no file can have that name
        raise JSONFileError(f"{str(path)!r} cannot name a file: it holds a NUL character", "not a file name") from None
    if len(raw) > max_bytes:
        raise _too_large(path, what, len(raw), max_bytes)
    try:
        text = raw.decode("utf-8-sig")  # a byte order mark some editors write is not part of the JSON
    except UnicodeDecodeError as why:
        raise JSONFileError(
            f"cannot read {path}: it is not UTF-8 text (a bad byte at offset {why.start})", "not UTF-8 text"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as why:
        problem = f"{why.msg} at line {why.lineno} column {why.colno}"
        raise JSONFileError(f"{path} is not valid JSON ({problem})", f"not valid JSON: {problem}") from None
    except ValueError:  # the one ValueError that is not a JSONDecodeError: Python's limit on digits
        digits = f"a number of over {sys.get_int_max_str_digits()} digits"
        raise JSONFileError(f"{path} is not valid JSON for {what} ({digits})", "not valid JSON") from None
    except RecursionError:  # the parser stops at Python's recursion limit (1000 levels by default)
        raise _too_deep(path, what) from None
    if not isinstance(data, dict):
        kind = _JSON_KINDS.get(type(data), "null")
        raise JSONFileError(f"{path} is not {what}: its JSON is {kind}, not an object", f"its JSON is {kind}")
    # A file that opens no more than MAX_DEPTH brackets cannot nest deeper: most files need no walk.
    if text.count("[") + text.count("{") > MAX_DEPTH and _deeper_than(data, MAX_DEPTH):
        raise _too_deep(path, what)
    return data


def _deeper_than(data: dict[str, Any], limit: int) -> bool:
    """Whether data nests more than limit lists and objects deep, found level by level (not by recursion)."""
    containers: list[Any] = [data]  # those at the level reached
    for _ in range(limit):
        containers = [
            child
            for parent in containers
            for child in (parent.values() if isinstance(parent, dict) else parent)
            if isinstance(child, (dict, list))
        ]
        if not containers:
            return False
    return True


def _too_deep(path: Path, what: str) -> JSONFileError:
    return JSONFileError(f"{path} is nested too deeply for {what} (over {MAX_DEPTH} levels)", "nested too deeply")


def _too_large(path: Path, what: str, size: int, limit: int) -> JSONFileError:
    shown = _size(size) if _size(size) != _size(limit) else f"{size:,} bytes"  # just over: say by how much
    sizes = f"{shown}; the limit is {_size(limit)}"
    return JSONFileError(f"{path} is too large for {what} ({sizes})", f"too large, {sizes}")


def _size(count: int) -> str:
    return f"{round(count / MiB, 1):g} MiB" if count >= MiB else f"{count:,} bytes"
