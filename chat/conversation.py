"""The conversation: its messages and system prompt, and saving/loading it as JSON."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from chat.artifact import model_label
from chat.errors import ChatError
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

    def in_context(self) -> list[dict[str, str]]:
        """What the model sees: the system prompt, then the messages still in context."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages[self.context_start :]]

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

    def drop_oldest_exchange(self) -> bool:
        """Move the context start past the oldest exchange still in context; False when none is left to drop."""
        rest = self.messages[self.context_start :]
        later_users = [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]
        if not later_users:
            return False
        self.context_start += later_users[0]
        return True


def record(conversation: Conversation, params: GenerationParams, model: str, backend: str) -> dict[str, Any]:
    """The session as saved, but for the time it is saved."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": model,
        "backend": backend,
        "system": conversation.system,
        "parameters": params.as_dict(),
        "created": conversation.created,
        "context_start": conversation.context_start,
        "messages": conversation.messages,
    }


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
    """One line for `chat --chats`: the file, when it was last written, its size and how it began."""
    written = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        messages = data["messages"]
        first = next((m["content"] for m in messages if m.get("role") == "user"), "")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as why:
        return f"{path}  {written}  (not a chat this can read: {type(why).__name__})"
    first = " ".join(readable(str(first)).split())
    first = first if len(first) <= 60 else first[:57] + "..."
    model = model_label(str(data.get("model") or ""))
    return f"{path}  {written}  {len(messages)} messages" + (f"  {model}" if model else "") + f'  "{first}"'


def save(path: Path, conversation: Conversation, params: GenerationParams, model: str, backend: str) -> None:
    """Write the session as JSON atomically: a temporary file beside the target, then a rename."""
    data = {**record(conversation, params, model, backend), "saved": now()}
    path = path.expanduser()
    try:
        if path.is_symlink():  # the rename replaces what the link points to, not the link
            path = path.resolve()
        if path.exists() and not path.is_file():  # a rename onto /dev/null (as root) would replace the device
            raise ChatError(f"{path} is not a regular file; pick another path")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as why:
        raise ChatError(f"cannot write {path}: {why.strerror or why}; pick another path") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, ensure_ascii=False, indent=2)
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
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChatError(f"no file {path}; check the path (!save writes one)") from None
    except IsADirectoryError:
        raise ChatError(f"{path} is a directory; name a saved session file") from None
    except (OSError, UnicodeDecodeError) as why:
        raise ChatError(f"cannot read {path}: {getattr(why, 'strerror', None) or why}") from None
    except ValueError as why:
        raise ChatError(f"{path} is not valid JSON ({why}); nothing was loaded") from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ChatError(f"{path} is not a saved chat session (it has no 'messages' list); nothing was loaded")
    if data.get("format", FORMAT) != FORMAT or not isinstance(data.get("version", 1), int):
        raise ChatError(f"{path} is a '{data.get('format')}' file, not a chat session; nothing was loaded")
    if data.get("version", 1) > FORMAT_VERSION:
        raise ChatError(f"{path} was saved by a newer chat (format {data['version']}); upgrade chat to load it")

    system = data.get("system")
    messages: list[dict[str, Any]] = []
    for number, message in enumerate(data["messages"], 1):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise ChatError(
                f"{path}: message {number} is not a {{'role', 'content'}} object with role "
                f"{', '.join(ROLES)}; nothing was loaded"
            )
        if message["role"] == "system":  # files from other tools keep the system prompt in the list
            system = message["content"]
            continue
        kept = {k: v for k, v in message.items() if k in ("role", "content", "interrupted")}
        messages.append({**kept, "content": readable(message["content"])})
    if system is not None and not isinstance(system, str):
        raise ChatError(f"{path}: 'system' must be text; nothing was loaded")
    system = None if system is None else readable(system)

    saved = data.get("parameters") or {}
    if not isinstance(saved, dict):
        raise ChatError(f"{path}: 'parameters' must be an object; nothing was loaded")
    changes = {}
    for key, value in saved.items():
        try:
            changes[key] = parse_value(key, "none" if value is None else str(value))
        except ChatError as why:
            raise ChatError(f"{path}: {why}; nothing was loaded") from None
    try:
        params = params.replace(**changes)
    except ChatError as why:
        raise ChatError(f"{path}: {why}; nothing was loaded") from None

    start = data.get("context_start", 0)
    start = start if isinstance(start, int) and 0 <= start <= len(messages) else 0
    created = data.get("created") if isinstance(data.get("created"), str) else now()
    return Conversation(system=system, messages=messages, context_start=start, created=created), params
