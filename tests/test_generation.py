"""The shared generation loop and sampler, on real tiny models, checked against transformers' own processors."""

from __future__ import annotations

import pytest
import torch
from helpers import backend_for

from chat.generation import ReplyStream, _Detokenizer
from chat.params import GenerationParams
from chat.sampling import Sampler


def sampler(**params) -> Sampler:
    return Sampler(GenerationParams(**params), {2}, torch.Generator().manual_seed(0))


def test_greedy_and_degenerate_sampling_pick_the_argmax():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(1))
    best = int(logits.argmax())
    context = torch.tensor([1, 2, 3])
    assert sampler(temperature=0).choose(logits, context, 0) == best
    assert sampler(temperature=5, top_k=1).choose(logits, context, 0) == best
    assert sampler(temperature=1, top_k=0, top_p=1e-6).choose(logits, context, 0) == best
    for top_k in (0, 50):  # 1e-300 is 0 in float32: still the likeliest token, never none
        assert sampler(temperature=1, top_k=top_k, top_p=1e-300).choose(logits, context, 0) == best


def test_nan_scores_are_a_clear_error():
    from chat.errors import ChatError

    logits = torch.full((300,), float("nan"))
    for params in ({"temperature": 0}, {"temperature": 0.7, "top_k": 50, "top_p": 0.9}):
        with pytest.raises(ChatError, match="NaN scores"):
            sampler(**params).choose(logits, torch.tensor([1]), 0)


def test_min_new_tokens_blocks_eos():
    logits = torch.zeros(10)
    logits[2] = 100.0  # EOS is by far the likeliest
    context = torch.tensor([0])
    assert sampler(temperature=0, min_new_tokens=3).choose(logits, context, 2) != 2
    assert sampler(temperature=0, min_new_tokens=3).choose(logits, context, 3) == 2


def _transformers_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(None, logits[None].clone())[0].softmax(-1)


# Small and vocabulary-sized logits; peaked ones (top-p's head holds the mass) and flat ones (it does not).
LOGITS = {
    "ramp": torch.linspace(0, 4, 20),
    "peaked": torch.randn(49152, generator=torch.Generator().manual_seed(4)) * 4,
    "flat": torch.randn(49152, generator=torch.Generator().manual_seed(5)) * 0.2,
}


@pytest.mark.parametrize("name", LOGITS)
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.7, 5, 1.0), (0.7, 0, 0.8), (1.0, 10, 0.5), (0.2, 50, 0.9)]
)
def test_distribution_is_what_transformers_samples_from(name, temperature, top_k, top_p):
    logits = LOGITS[name]
    s = Sampler(GenerationParams(temperature=temperature, top_k=top_k, top_p=top_p), set(), torch.Generator())
    ids, probs = s.distribution(logits)
    candidates = torch.zeros_like(logits)
    candidates[torch.arange(logits.numel()) if ids is None else ids] = probs
    expected = _transformers_probs(logits, temperature, top_k, top_p)
    for ours in (candidates, s.masked(logits)):  # the CPU way and the GPU way
        assert torch.equal(ours > 0, expected > 0)  # the same tokens may be sampled
        assert torch.allclose(ours, expected, atol=1e-6)


def test_samples_follow_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -30.0])
    s = sampler(temperature=1.0, top_k=0, top_p=1.0)
    picks = [s.choose(logits, torch.tensor([0]), 5) for _ in range(3000)]
    counts = torch.bincount(torch.tensor(picks), minlength=4).float() / len(picks)
    assert torch.allclose(counts, logits.softmax(-1), atol=0.03)


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(50, generator=torch.Generator().manual_seed(3)) * 3
    context = torch.tensor([4, 9, 9, 17])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(context[None], logits[None].clone())[0]
    s = sampler(temperature=0, repetition_penalty=1.3)
    assert s.choose(logits, context, 0) == int(expected.argmax())
    # Penalise the winner hard enough and the choice moves.
    winner = int(logits.argmax())
    assert sampler(temperature=0, repetition_penalty=100.0).choose(logits, torch.tensor([winner]), 0) != winner


def test_detokenizer_streams_multibyte_text_exactly(tiny_llama):
    tokenizer = backend_for(tiny_llama).tokenizer
    text = "héllo wörld — ünïcödé 😀 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = _Detokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def _reply(backend, prompt_ids, params, stops=()):
    stream = ReplyStream(backend, prompt_ids, params, torch.Generator().manual_seed(7), stops)
    pieces = list(stream)
    assert "".join(pieces) == stream.text
    return stream


def test_stop_string_cuts_reply_and_is_never_shown(tiny_llama):
    backend = backend_for(tiny_llama)
    prompt = backend.tokenizer.encode("Hello", add_special_tokens=False)
    params = GenerationParams(temperature=1.0, top_k=0, max_new_tokens=30, min_new_tokens=30, seed=7)
    free = _reply(backend, prompt, params)
    assert free.finish == "length" and len(free.text) > 12
    stop = free.text[8:11]
    cut = _reply(backend, prompt, params, [stop])
    assert cut.finish == "stop" and cut.text == free.text[: free.text.find(stop)]


def test_max_new_tokens_and_context_limit(tiny_llama):
    backend = backend_for(tiny_llama)
    params = GenerationParams(temperature=1.0, top_k=0, max_new_tokens=5)
    assert _reply(backend, [5, 6, 7], params).stats.new_tokens <= 5
    # A prompt that nearly fills the 256-token context leaves room for two tokens only.
    near_full = _reply(backend, [5] * 254, params.replace(max_new_tokens=50, min_new_tokens=50))
    assert near_full.stats.new_tokens == 2 and near_full.finish == "length"


def test_prefix_reuse_gives_the_same_logits(tiny_llama):
    backend = backend_for(tiny_llama)
    first = list(range(5, 40))
    backend.prefill(first)
    backend.decode(41)
    reused = backend.prefill([*first, 41, 42, 43])  # extends what is cached: only 42 and 43 run
    cropped = backend.prefill(first[:20])  # shorter than what is cached: the cache is cut back
    backend.prefill([1])  # another sequence: the cache starts over
    torch.testing.assert_close(reused, backend.prefill([*first, 41, 42, 43]), rtol=1e-4, atol=1e-4)
    backend.prefill([1])
    torch.testing.assert_close(cropped, backend.prefill(first[:20]), rtol=1e-4, atol=1e-4)
