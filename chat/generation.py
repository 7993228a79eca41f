"""The generation loop shared by every backend: sample, stop, and turn tokens into streamed text."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from chat.backends.base import Backend
from chat.engine import ReplyStats
from chat.params import GenerationParams
from chat.sampling import Sampler
from chat.signals import Signals
from chat.threads import ThreadTuner


class ReplyStream:
    """Iterate to get the reply as text pieces; afterwards `text`, `finish` and `stats` describe it.

    finish is "eos" (the model ended), "stop" (a stop string), "length" (max_new_tokens or the
    context limit) or "interrupted" (Ctrl+C, or a closing signal: see chat.signals).
    """

    def __init__(
        self,
        backend: Backend,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        generator: torch.Generator,
        stop_strings: Sequence[str] = (),
        signals: Signals | None = None,
        tuner: ThreadTuner | None = None,
    ):
        self.backend = backend
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sampler = Sampler(params, backend.tokenizer.eos_token_ids, generator)
        self.stop_strings = [s for s in stop_strings if s]
        self.signals = signals or Signals()  # Ctrl+C sets signals.stop: the reply ends before its next token
        self.tuner = tuner  # follows other programs' use of the CPUs with torch's thread count
        self.text = ""  # what has been handed out
        self.finish = ""
        self.stats = ReplyStats(prompt_tokens=len(self.prompt_ids))

    def __iter__(self) -> Iterator[str]:
        room = self.backend.info.context_length - len(self.prompt_ids)
        limit = min(self.params.max_new_tokens, room)
        context = torch.tensor(self.prompt_ids, dtype=torch.long)
        if self.params.repetition_penalty != 1.0:
            context = torch.cat([context, torch.empty(limit, dtype=torch.long)])
        used = len(self.prompt_ids)

        started = time.perf_counter()
        self._first_at = started
        try:
            yield from self._run(context, used, limit, started)
        finally:  # also when the caller stops early (Ctrl+C)
            elapsed = time.perf_counter() - self._first_at
            if self.stats.new_tokens > 1 and elapsed > 0:
                self.stats.decode_tok_s = (self.stats.new_tokens - 1) / elapsed

    def _run(self, context: torch.Tensor, used: int, limit: int, started: float) -> Iterator[str]:
        backend, tokenizer = self.backend, self.backend.tokenizer
        self.signals.blocking = True
        logits = backend.prefill(self.prompt_ids)
        self.signals.blocking = False
        ids: list[int] = []
        pending = _Detokenizer(tokenizer)
        body = ""  # all text decoded so far, before stop-string trimming
        self.finish = "length"
        while len(ids) < limit:
            token = self.sampler.choose(logits, context[:used], len(ids))
            if not ids:
                self._first_at = time.perf_counter()
                self.stats.ttft_ms = (self._first_at - started) * 1000
            if token in tokenizer.eos_token_ids:
                self.finish = "eos"
                break
            ids.append(token)
            self.stats.new_tokens = len(ids)
            if self.params.repetition_penalty != 1.0:
                context[used] = token
            used += 1
            body += pending.push(token)
            cut = self._stop_at(body)
            if cut is not None:
                body = body[:cut]
                self.finish = "stop"
                break
            piece = self._release(body)
            if piece:
                yield piece
            if self.signals.stop:
                self.finish = "interrupted"
                break
            if len(ids) < limit:
                if self.tuner is not None:
                    self.tuner.step()
                logits = backend.decode(token)
        if self.finish != "stop":
            body += pending.flush()
            cut = self._stop_at(body)
            if cut is not None:
                body, self.finish = body[:cut], "stop"
        piece = self._release(body, final=True)
        if piece:
            yield piece

    def _stop_at(self, body: str) -> int | None:
        hits = [i for i in (body.find(s) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None

    def _release(self, body: str, final: bool = False) -> str:
        """The new text that can be shown: no leading space, and (until the end) nothing that
        could be the start of a stop string."""
        visible = body.lstrip()
        hold = 0 if final else self._held(body)
        shown = visible[: max(0, len(visible) - hold)]
        piece = shown[len(self.text) :]
        self.text += piece
        return piece

    def _held(self, body: str) -> int:
        hold = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(body)), hold, -1):
                if body.endswith(stop[:n]):
                    hold = n
                    break
        return hold


class _Detokenizer:
    """Turns tokens into text as they come, holding back bytes of a character not yet complete."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # end of what has been turned into text

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]
