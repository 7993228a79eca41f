"""Next-token choice from logits, in torch: one implementation for every backend, so a setting
means the same thing whichever backend runs it. Semantics follow transformers' logits processors."""

from __future__ import annotations

import torch

from chat.params import GenerationParams


class Sampler:
    def __init__(self, params: GenerationParams, eos_token_ids: set[int], generator: torch.Generator):
        self.params = params
        self.eos = sorted(eos_token_ids)
        self.generator = generator
        self._eos_index: torch.Tensor | None = None

    def choose(self, logits: torch.Tensor, context_ids: torch.Tensor, new_tokens: int) -> int:
        """Pick the next token.

        logits: 1-D next-token scores; context_ids: 1-D prompt and generated ids so far (for the
        repetition penalty); new_tokens: how many tokens this reply has so far.
        """
        p = self.params
        logits = logits.float()
        if p.repetition_penalty != 1.0:
            context_ids = context_ids.to(logits.device)
            seen = logits.gather(0, context_ids)
            seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
            logits = logits.scatter(0, context_ids, seen)
        if new_tokens < p.min_new_tokens and self.eos:
            if self._eos_index is None or self._eos_index.device != logits.device:
                self._eos_index = torch.tensor(self.eos, device=logits.device)
            logits = logits.index_fill(0, self._eos_index, float("-inf"))
        if p.temperature == 0:
            return int(logits.argmax())
        logits = logits / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # Drop the low tail whose mass is at most 1 - top_p; always keep the likeliest token.
            drop = cumulative <= (1 - p.top_p)
            drop[-1] = False
            logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        if probs.device != self.generator.device:
            probs = probs.to(self.generator.device)
        return int(torch.multinomial(probs, 1, generator=self.generator))
