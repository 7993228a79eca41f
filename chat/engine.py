"""What the session asks of whatever writes the replies: the messages in, a stream of text out.

An engine is either local (chat.local: our tokenizer, prompt, sampler and a token-level backend) or remote
(chat.remote: an OpenAI-compatible server). The session hands it the conversation and the generation
parameters; it fits the conversation into the model's context and streams the reply. Nothing here imports
torch, so a remote chat never does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from chat.conversation import Conversation
    from chat.params import GenerationParams
    from chat.signals import Signals


@dataclass
class ReplyStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_ms: float = 0.0  # time to first token: prompt processing plus one sample (remote: the first text)
    decode_tok_s: float = 0.0  # tokens after the first, per second

    def line(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tok, reply {self.new_tokens} tok, "
            f"first token {self.ttft_ms:.0f} ms, {self.decode_tok_s:.1f} tok/s"
        )


@dataclass
class ReplyRequest:
    """What the session asks for: the next reply to `conversation` (its last message is the user's)."""

    conversation: Conversation  # the engine may move its context_start (drop-oldest)
    params: GenerationParams
    chosen: frozenset[str]  # the parameters the user set (a flag, !set, a loaded chat): what a server is sent
    policy: str  # drop-oldest | error: when the history outgrows the context
    signals: Signals  # Ctrl+C and closing signals, read between tokens


class Reasoning(str):
    """A piece of a reply that is the model's reasoning (a server's reasoning_content), not its answer: shown
    dimmed or not at all, and never kept in the conversation."""


class Reply(Protocol):
    """One reply: start() (which may raise ChatError, nothing shown yet), then iterate for its text pieces;
    afterwards `text`, `finish` and `stats` describe it.

    finish is "eos" (the model ended), "stop" (a stop string), "length" (max_new_tokens or the context
    limit) or "interrupted" (Ctrl+C, or a closing signal: see chat.signals)."""

    text: str
    finish: str
    stats: ReplyStats
    dropped: int  # exchanges start() dropped from the context to make room
    room: int | None  # the most tokens the reply may have, when the context allows fewer than max_new_tokens
    notices: list[str]  # remarks of the engine's to show before the reply (a parameter a server cannot take)
    error: str | None  # why the reply broke off (a server's error mid-stream); the text before it stays

    def start(self) -> None: ...

    def __iter__(self) -> Iterator[str]:
        """The reply's text as it comes (Reasoning pieces are not part of `text`)."""
        ...


@dataclass
class Row:
    """One line of !status: a name and its value."""

    name: str
    value: str


class Engine(Protocol):
    name: str  # what runs the model: "torchscript", "transformers" or "remote"
    model: str  # the model as the user named it (or the served model's id)
    context_length: int | None  # most tokens of prompt and reply; None when a server does not say
    notes: list[str]  # said once when the chat starts (e.g. why auto fell back)

    def reply(self, request: ReplyRequest) -> Reply: ...

    def recommended(self) -> dict[str, Any]:
        """Generation parameters the model recommends (its generation_config.json), by chat's names."""
        ...

    def warm_up(self, conversation: Conversation) -> None:
        """Do what a first reply would wait for, while the person is still typing."""
        ...

    def context_tokens(self, conversation: Conversation) -> int | None:
        """Tokens the conversation's context takes, if the engine can tell."""
        ...

    def reseed(self, seed: int | None) -> None:
        """Restart the random sequence (None: a fresh random seed)."""
        ...

    def settle_thread(self) -> None:
        """Run on the calling thread as the engine was loaded (it loaded in another: torch's thread count is
        per thread)."""
        ...

    def describe(self) -> str:
        """What runs the model, for the chat's first line: "torchscript on cpu, bfloat16, ..."."""
        ...

    def status(self) -> list[Row]:
        """The engine's lines of !status (model, backend or server, device, parameters sent)."""
        ...

    def origin(self) -> dict[str, Any]:
        """What a saved chat records of the engine, so --continue can find it again: model, backend, ..."""
        ...

    def close(self) -> None: ...
