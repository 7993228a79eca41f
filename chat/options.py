"""The options of one run of chat, as the command line gave them: plain data, read by everything below the
command line and changed by nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Options:
    model: str
    model_given: bool
    backend: str
    device: str
    dtype: str
    quantize: str  # auto | int8 | int4 | none: the weights of an artifact exported on first use
    export: bool  # export on first use (--backend auto, unless --no-export)
    threads: int | None
    param_changes: dict[str, Any]  # generation parameters given on the command line
    system: str | None
    user: str
    prompt: str | None
    stream: bool
    wrap: bool  # break a reply on screen between words
    context_policy: str
    save_dir: Path
    load: Path | None
    keep_in: Path | None  # where an interactive chat keeps itself after each turn; None: autosave is off
    list_chats: bool  # --chats: list the kept chats instead of chatting
    cache: str | None  # --cache: "list"; --cache-remove NAME: NAME
    trust_remote_code: bool
    offline: bool
    verbose: bool
    base_url: str | None = None  # a remote engine's API base (--base-url, $CHAT_BASE_URL, $OPENAI_BASE_URL)
    api_key: str | None = field(default=None, repr=False)  # the remote engine's key: never printed
    local_only: bool = False  # --offline: a server must be on this machine (HF_HUB_OFFLINE alone allows any)
    reasoning: bool = True  # show a server's reasoning, dimmed (not --hide-reasoning)
