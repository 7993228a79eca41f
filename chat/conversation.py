"""The conversation: its messages and system prompt, and saving/loading it as JSON."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from chat.artifact import model_label
from chat.errors import ChatError
from chat.jsonfile import CHAT_MAX_BYTES, JSONFileError, NoSuchFile, read_json
from chat.params import GenerationParams, parse_value
from chat.text import readable

FORMAT = "chat-session"
FORMAT_VERSION = 1
ROLES = ("system", "user", "assistant")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Conversation:
    system: str | None = None
    # {"role": "user"|"assistant", "content": str}; a reply cut short by Ctrl+C also has "interrupted": True
    messages: list[dict[str, Any]] = field(default_factory=list)
    # Messages before this index were dropped from the model's context (drop-oldest) but are kept here.
    context_start: int = 0
    created: str = field(default_factory=now)

    def add(self, role: str, content: str, **extra: Any) -> None:
        self.messages.append({"role": role, "content": content, **extra})

    def in_context(self, start: int | None = None) -> list[dict[str, str]]:
        """What the model sees: the system prompt, then the messages from `start` (default: the context start)."""
        start = self.context_start if start is None else start
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages[start:]]

    def clear(self) -> None:
        self.messages.clear()
        self.context_start = 0

    def undo(self) -> int:
        """Drop the last exchange (the last user message and what follows it); return how many messages went."""
        for index in range(len(self.messages) - 1, -1, -1):
            if self.messages[index]["role"] == "user":
                dropped = len(self.messages) - index
                del self.messages[index:]
                self.context_start = min(self.context_start, index)
                return dropped
        return 0

    def context_starts(self) -> list[int]:
        """Where the context may start, most history first: where it starts now, then each later user message
        (the n-th later start drops the n oldest exchanges still in context)."""
        later = [i for i in range(self.context_start + 1, len(self.messages)) if self.messages[i]["role"] == "user"]
        return [self.context_start, *later]


def record(conversation: Conversation, params: GenerationParams, origin: dict[str, Any]) -> dict[str, Any]:
    """The session as saved, but for the time it is saved. origin: what ran it (model, backend, a server's
    base_url), so --continue can go back to it."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **origin,
        "system": conversation.system,
        "parameters": params.as_dict(),
        "created": conversation.created,
        "context_start": conversation.context_start,
        "messages": conversation.messages,
    }


def origin(path: Path) -> dict[str, Any]:
    """What ran a saved chat (model, backend, a server's base_url), as far as the file says; {} for a file
    that cannot tell (its problems are said when it loads)."""
    try:
        data = read_json(path.expanduser(), "a saved chat session", CHAT_MAX_BYTES)
    except ChatError:
        return {}
    return {key: data[key] for key in ("model", "backend", "base_url") if isinstance(data.get(key), str)}


def new_session_file(directory: Path) -> Path:
    """A file name for a session started now, in the form !save and --continue know."""
    return directory / f"chat-{datetime.now():%Y%m%d-%H%M%S}.json"


def session_files(directory: Path) -> list[Path]:
    """The session files in directory (named as new_session_file names them), the one written last first."""
    files = [path for path in directory.glob("chat-*.json") if path.is_file()]
    return sorted(files, key=lambda path: path.stat().st_mtime, reverse=True)


def newest_session_file(directory: Path) -> Path | None:
    """The session file in directory written last, if any."""
    return next(iter(session_files(directory)), None)


def describe_session_file(path: Path) -> str:
    """One line for `chat --chats`: the file, when it was last written, how many messages and how it began;
    for a file that is not a chat this can read, why not."""
    written = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    try:
        data = read_json(path, "a saved chat session", CHAT_MAX_BYTES)
    except JSONFileError as why:
        return f"{path}  {written}  (not a chat: {why.reason})"
    messages = data.get("messages")
    if not isinstance(messages, list):
        return f"{path}  {written}  (not a chat: it has no 'messages' list)"
    first = next((m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"), "")
    first = " ".join(readable(first if isinstance(first, str) else "").split())
    first = first if len(first) <= 60 else first[:57] + "..."
    model = model_label(data["model"]) if isinstance(data.get("model"), str) else ""
    return f"{path}  {written}  {len(messages)} messages" + (f"  {model}" if model else "") + f'  "{first}"'


def is_chat_file(path: Path) -> bool:
    """Whether path holds one of chat's own saved chats (so !save may replace it without being told to)."""
    try:
        data = read_json(path, "a saved chat session", CHAT_MAX_BYTES)
    except ChatError:
        return False
    return data.get("format") == FORMAT


def write(path: Path, data: dict[str, Any], replace_any: bool = False) -> None:
    """Write a chat as JSON atomically: a temporary file beside the target, then a rename.

    A file there that is not one of chat's chats is replaced only with replace_any; one that is keeps its
    mode. A symbolic link is followed (the file it names is replaced, the link stays)."""
    path = path.expanduser()
    try:
        if path.is_symlink():
            path = path.resolve()
        mode = None
        if path.exists():
            if not path.is_file():  # a rename onto /dev/null (as root) would replace the device
                raise ChatError(f"{path} is not a regular file; pick another path")
            if not replace_any and not is_chat_file(path):
                raise ChatError(f"{path} exists and is not a chat saved by chat; !save! {path} replaces it")
            mode = stat.S_IMODE(path.stat().st_mode)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as why:
        raise ChatError(f"cannot write {path}: {why.strerror or why}; pick another path") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            if mode is not None:
                os.fchmod(out.fileno(), mode)
            json.dump({**data, "saved": now()}, out, ensure_ascii=False, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as why:
        Path(tmp).unlink(missing_ok=True)
        raise ChatError(f"cannot write {path}: {why.strerror or why}; pick another path") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, params: GenerationParams) -> tuple[Conversation, GenerationParams]:
    """Read a saved session; every check passes before anything is returned, so a bad file changes nothing.

    Besides our own files, any JSON object with a `messages` list of {"role", "content"} loads.
    """
    path = path.expanduser()
    try:
        data = read_json(path, "a saved chat session", CHAT_MAX_BYTES)
    except NoSuchFile:
        raise ChatError(f"no file {path}; check the path (!save writes one)") from None
    except JSONFileError as why:
        raise ChatError(f"{why}; nothing was loaded") from None

    def bad(problem: str) -> ChatError:
        return ChatError(f"{path}: {problem}; nothing was loaded")

    if not isinstance(data.get("messages"), list):
        raise ChatError(f"{path} is not a saved chat session (it has no 'messages' list); nothing was loaded")
    kind, version = data.get("format", FORMAT), data.get("version", 1)
    if kind != FORMAT:
        named = f"a '{kind}'" if isinstance(kind, str) and len(kind) <= 40 else "another kind of"
        raise ChatError(f"{path} is {named} file, not a chat session; nothing was loaded")
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad("'version' must be a whole number")
    if version > FORMAT_VERSION:
        raise ChatError(f"{path} was saved by a newer chat (format {version}); upgrade chat to load it")

    system = data.get("system")
    messages: list[dict[str, Any]] = []
    for number, message in enumerate(data["messages"], 1):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise bad(f"message {number} is not a {{'role', 'content'}} object with role {', '.join(ROLES)}")
        if not isinstance(message.get("interrupted", False), bool):
            raise bad(f"message {number}: 'interrupted' must be true or false")
        if message["role"] == "system":  # files from other tools keep the system prompt in the list
            system = message["content"]
            continue
        kept = {k: v for k, v in message.items() if k in ("role", "content", "interrupted")}
        messages.append({**kept, "content": readable(message["content"])})
    if system is not None and not isinstance(system, str):
        raise bad("'system' must be text")
    system = None if system is None else readable(system)

    saved = data.get("parameters") or {}
    if not isinstance(saved, dict):
        raise bad("'parameters' must be an object")
    changes = {}
    for key, value in saved.items():
        try:
            changes[key] = parse_value(key, "none" if value is None else str(value))
        except ChatError as why:
            raise bad(str(why)) from None
    try:
        params = params.replace(**changes)
    except ChatError as why:
        raise bad(str(why)) from None

    start = data.get("context_start", 0)
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= len(messages):
        raise bad(f"'context_start' must be a whole number from 0 to {len(messages)}")
    created = data.get("created", now())
    if not isinstance(created, str):
        if "format" in data:
            raise bad("'created' must be text (a date and time)")
        created = now()  # another tool's file may say when in its own way (a number, say)
    return Conversation(system=system, messages=messages, context_start=start, created=created), params
