"""The engine that runs the model here: our tokenizer, chat template and prompt fitting, our sampler, and a
token-level backend (TorchScript or transformers) that turns tokens into next-token logits."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from chat.backends.base import Backend, BackendInfo
from chat.conversation import Conversation
from chat.engine import ReplyRequest, ReplyStats, Row
from chat.params import model_recommendations
from chat.prompt import build_prompt, encode
from chat.threads import ThreadTuner


class LocalEngine:
    def __init__(self, backend: Backend, user_label: str):
        import torch

        self.backend = backend
        self.info = backend.info
        self.user_label = user_label  # how a model without a chat template sees the user's turns
        self.generator = torch.Generator(device=self.info.device)
        self.tuner = ThreadTuner(self.info)  # torch's thread count follows other programs' use of the CPUs
        self.name = self.info.name
        self.model = self.info.model
        self.context_length: int | None = self.info.context_length
        self.notes = self.info.notes

    def reply(self, request: ReplyRequest) -> LocalReply:
        return LocalReply(self, request)

    def recommended(self) -> dict[str, Any]:
        return model_recommendations(self.info.path)

    def warm_up(self, conversation: Conversation) -> None:
        """The chat template's first render, the tokenizer's first calls and the model's first runs
        (TorchScript sets its graphs up on the first call). The prompt's start, which the first message will
        share (the system prompt, or a resumed conversation), stays in the model's cache."""
        messages = [*conversation.in_context(), {"role": "user", "content": ""}]
        with contextlib.suppress(Exception):  # a failure shows, in words, when the first message meets it
            ids = encode(self.backend.tokenizer, messages, self.user_label)
            if len(ids) < self.info.context_length:  # a long reply is capped, not refused
                self.backend.decode(int(self.backend.prefill(ids).argmax()))

    def context_tokens(self, conversation: Conversation) -> int:
        messages = conversation.in_context()
        return len(encode(self.backend.tokenizer, messages, self.user_label)) if messages else 0

    def reseed(self, seed: int | None) -> None:
        self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)

    def settle_thread(self) -> None:
        import torch

        torch.set_num_threads(self.info.threads)

    def describe(self) -> str:
        return f"{self.info.name} on {self.info.device}, {self.info.runs_on}"

    def status(self) -> list[Row]:
        info = self.info
        return [
            Row("model", f"{info.model} ({info.path})" if info.path != info.model else info.model),
            Row("backend", info.name + (f" ({info.reason})" if info.reason else "")),
            Row("device", describe_device(info)),
        ]

    def origin(self) -> dict[str, str]:
        return {"model": self.info.model, "backend": self.info.name}

    def close(self) -> None:
        self.backend.close()


class LocalReply:
    """A reply made here: the conversation fitted to the model's context by start(), then ReplyStream."""

    def __init__(self, engine: LocalEngine, request: ReplyRequest):
        self.engine, self.request = engine, request
        self.text, self.finish, self.stats = "", "", ReplyStats()
        self.dropped, self.room = 0, None
        self.notices: list[str] = []
        self.error: str | None = None
        self._stream = None

    def start(self) -> None:
        from chat.generation import ReplyStream

        engine, params = self.engine, self.request.params
        prompt = build_prompt(
            engine.backend.tokenizer,
            self.request.conversation,
            context_length=engine.info.context_length,
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens,
            policy=self.request.policy,
            user_label=engine.user_label,
        )
        self.dropped = prompt.dropped
        self.room = prompt.reply_room if prompt.reply_room < params.max_new_tokens else None
        self._stream = ReplyStream(
            engine.backend,
            prompt.ids,
            params,
            engine.generator,
            prompt.stop_strings,
            signals=self.request.signals,
            tuner=engine.tuner,
        )
        self.stats = self._stream.stats

    def __iter__(self) -> Iterator[str]:
        assert self._stream is not None, "start() first"
        try:
            for piece in self._stream:
                self.text = self._stream.text
                yield piece
        finally:
            self.text, self.finish = self._stream.text, self._stream.finish


def describe_device(info: BackendInfo) -> str:
    """ "cpu, bfloat16, native AVX-512 kernels, 2 threads (one per CPU)": where and how the model runs."""
    threads = f", {info.threads} thread" + ("s" if info.threads != 1 else "")
    threads += f" ({info.threads_reason})" if info.threads_reason else ""
    return f"{info.device}, {info.runs_on}" + (threads if info.device == "cpu" else "")
