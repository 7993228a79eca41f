"""Next-token choice from logits, in torch: one implementation for every backend, so a setting
means the same thing whichever backend runs it. Semantics follow transformers' logits processors
(repetition penalty, min_new_tokens, temperature, then top-k, then top-p).

On the CPU, top-k and top-p work on the few likeliest tokens, sorted, rather than on the whole vocabulary,
and the draw is by inverse CDF: a full sort plus torch.multinomial over 49k logits cost 2 ms a token on 2
cores with the demo model's settings, a tenth of its decode step. On a GPU, whole-vocabulary ops are cheap
and picking out candidates would wait on the device several times a token, so it masks instead."""

from __future__ import annotations

import torch

from chat.errors import ChatError
from chat.params import GenerationParams

# Top-p without top-k sorts only the tokens within HEAD_GAP (in logits after temperature) of the likeliest
# one. Each token further down is under e^-16 times as likely as that one, so even 50k of them hold under
# 0.6% of the mass: they are in the tail top-p drops unless top_p is above 0.994.
HEAD_GAP = 16.0


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
        logits = self._adjusted(logits, context_ids, new_tokens)
        if new_tokens == 0 and bool(torch.isnan(logits).any()):  # checked once a reply: broken weights show at once
            raise ChatError(
                "the model gave NaN scores: its weights are broken or overflow in this dtype; try --dtype float32"
            )
        if self.params.temperature == 0:
            return int(logits.argmax())
        ids, probs = self.distribution(logits) if logits.device.type == "cpu" else (None, self.masked(logits))
        if probs.device != self.generator.device:
            probs = probs.to(self.generator.device)
        # Inverse CDF: the first token whose cumulative probability passes a uniform draw.
        cdf = probs.cumsum(0)
        draw = torch.rand(1, generator=self.generator, device=probs.device) * cdf[-1]
        pick = int(torch.searchsorted(cdf, draw, right=True).clamp(max=probs.numel() - 1))
        return pick if ids is None else int(ids[pick])

    def distribution(self, logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The tokens that may be sampled and their probabilities, after temperature, top-k and top-p.

        Returns (ids, probs): probs[i] is the probability of token ids[i], likeliest first; ids None means
        every token, probs then indexed by token id."""
        p = self.params
        values = logits / p.temperature
        if 0 < p.top_k < values.numel():
            ids, values = _top_k(values, p.top_k)
            probs = values.softmax(0)  # top-p sees only what top-k kept
        elif p.top_p < 1.0:
            ids, probs = _head(values, p.top_p)
        else:
            return None, values.softmax(0)
        if p.top_p < 1.0:
            # As transformers' TopPLogitsWarper, which drops the least likely tokens while their total
            # is at most 1 - top_p: keep each token whose likelier tokens hold less than top_p.
            # The first token always stays (a top_p below float32's range would otherwise keep none).
            count = max(1, int(((probs.cumsum(0) - probs) < p.top_p).sum()))
            ids, probs = ids[:count], probs[:count]
        return ids, probs / probs.sum()

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities of every token after temperature, top-k and top-p (the same as distribution()),
        computed over the whole vocabulary with no step that waits on the device."""
        p = self.params
        values = logits / p.temperature
        if 0 < p.top_k < values.numel():
            kth = torch.topk(values, p.top_k).values[-1]
            values = values.masked_fill(values < kth, float("-inf"))
        if p.top_p < 1.0:
            ascending, order = torch.sort(values)
            cumulative = ascending.softmax(0).cumsum(0)
            drop = cumulative <= 1 - p.top_p
            drop[-1] = False
            values = values.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        return values.softmax(0)

    def _adjusted(self, logits: torch.Tensor, context_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """float32 logits after the repetition penalty and, before min_new_tokens, with EOS ruled out."""
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
        return logits


def _top_k(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k likeliest token ids and their values, likeliest first. Tokens tied with the k-th stay too,
    as in transformers, whose warper keeps every value >= the k-th."""
    top, ids = torch.topk(values, k + 1)
    if top[k] < top[k - 1]:
        return ids[:k], top[:k]
    return _sorted(torch.nonzero(values >= top[k - 1]).flatten(), values)


def _head(values: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens top-p can keep and their probabilities, likeliest first: those near the top (see HEAD_GAP)
    when they hold at least top_p of the mass, otherwise all of them."""
    probs = values.softmax(0)
    head = torch.nonzero(values >= values.max() - HEAD_GAP).flatten()
    if probs[head].sum() < top_p:
        head = torch.arange(values.numel(), device=values.device)
    ids, _ = _sorted(head, values)
    return ids, probs[ids]


def _sorted(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and their values, by value, highest first."""
    top, order = torch.sort(values[ids], descending=True)
    return ids[order], top
