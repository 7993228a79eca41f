"""The TorchScript backend on exported tiny models: logits and tokens against transformers, the prefix
cache, chunked and interrupted prefill, sampling parameters, the context limit, and no transformers import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ARTIFACT_MAX_LEN as MAX_LEN

from chat.backends.base import LoadOptions
from chat.backends.torchscript_backend import TorchScriptBackend
from chat.backends.transformers_backend import TransformersBackend
from chat.errors import ChatError
from chat.export import export
from chat.generation import ReplyStream
from chat.params import GenerationParams


@pytest.fixture(scope="session")
def gpt2_artifact(tiny_gpt2, tmp_path_factory) -> Path:
    return export(str(tiny_gpt2), tmp_path_factory.mktemp("ts") / "gpt2", max_len=MAX_LEN)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """transformers' logits for every prefix of a fixed sequence (one forward pass, no cache)."""
    hf = TransformersBackend(LoadOptions(model=str(tiny_llama), dtype="float32", device="cpu"))
    ids = [(7 * i + 3) % 290 + 3 for i in range(40)]
    with torch.inference_mode():
        logits = hf.model(input_ids=torch.tensor([ids])).logits[0]
    hf.close()
    return ids, logits


@pytest.fixture
def backend(llama_artifact):
    b = TorchScriptBackend(llama_artifact)
    yield b
    b.close()


class Recorder:
    """Stands in for the TorchScript module: counts the tokens run, can raise Ctrl+C on a chosen call."""

    def __init__(self, module, interrupt_on_call: int | None = None):
        self.module, self.calls, self.tokens = module, 0, 0
        self.interrupt_on_call = interrupt_on_call

    def prefill(self, ids, positions, window):
        self.calls += 1
        if self.calls == self.interrupt_on_call:
            raise KeyboardInterrupt
        self.tokens += len(ids)
        return self.module.prefill(ids, positions, window)

    def decode(self, ids, positions, window):
        self.tokens += 1
        return self.module.decode(ids, positions, window)


@pytest.mark.parametrize("length", [1, 7, 21, 40])
def test_prefill_matches_transformers(backend, reference, length):
    ids, logits = reference
    backend._chunk = 8  # so 21 and 40 take several chunks
    torch.testing.assert_close(backend.prefill(ids[:length]), logits[length - 1], atol=1e-4, rtol=1e-4)


def test_decode_matches_transformers(backend, reference):
    ids, logits = reference
    backend.prefill(ids[:5])
    for n in range(5, 12):
        torch.testing.assert_close(backend.decode(ids[n]), logits[n], atol=1e-4, rtol=1e-4)


def test_prefix_reuse_gives_fresh_logits(backend, reference):
    ids, logits = reference
    recorder = backend.module = Recorder(backend.module)
    backend.prefill(ids[:20])
    out = backend.prefill(ids[:30])  # extends: only the 10 new tokens run
    assert recorder.tokens == 30
    torch.testing.assert_close(out, logits[29], atol=1e-4, rtol=1e-4)
    other = [*ids[:12], 5, 6, 7]  # diverges after 12 cached tokens
    torch.testing.assert_close(backend.prefill(other), _fresh(backend, other), atol=1e-4, rtol=1e-4)
    assert recorder.tokens == 33
    same = backend.prefill(other)  # all cached: the last token is recomputed for its logits
    assert recorder.tokens == 34
    torch.testing.assert_close(same, _fresh(backend, other), atol=1e-4, rtol=1e-4)


def _fresh(backend: TorchScriptBackend, ids: list[int]) -> torch.Tensor:
    fresh = TorchScriptBackend(backend.info.path)
    try:
        return fresh.prefill(ids)
    finally:
        fresh.close()


def test_interrupted_prefill_leaves_cache_consistent(backend, reference):
    ids, logits = reference
    backend._chunk = 8
    backend.module = Recorder(backend.module, interrupt_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        backend.prefill(ids[:30])
    assert backend._cached == ids[:16]  # the two chunks that finished
    torch.testing.assert_close(backend.prefill(ids[:30]), logits[29], atol=1e-4, rtol=1e-4)


def _reply(backend, prompt: list[int], seed: int = 0, **params) -> tuple[str, ReplyStream]:
    stream = ReplyStream(backend, prompt, GenerationParams(**params), torch.Generator().manual_seed(seed))
    text = "".join(stream)
    return text, stream


@pytest.mark.parametrize("artifact, model", [("llama_artifact", "tiny_llama"), ("gpt2_artifact", "tiny_gpt2")])
def test_replies_match_transformers(request, artifact, model):
    """Greedy and seeded sampling give the same text as the transformers backend (float32, CPU)."""
    ts = TorchScriptBackend(request.getfixturevalue(artifact))
    hf = TransformersBackend(LoadOptions(model=str(request.getfixturevalue(model)), dtype="float32", device="cpu"))
    prompt = ts.tokenizer.encode("The capital of France is", add_special_tokens=False)
    settings = [
        {"temperature": 0.0, "max_new_tokens": 24, "min_new_tokens": 24},
        {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.3, "max_new_tokens": 24},
    ]
    for params in settings:
        assert _reply(ts, prompt, **params)[0] == _reply(hf, prompt, **params)[0]
    ts.close()
    hf.close()


def test_sampling_parameters_are_honoured(backend):
    prompt = backend.tokenizer.encode("Hello, how are you", add_special_tokens=False)
    greedy = _reply(backend, prompt, temperature=0.0, max_new_tokens=12)[0]
    assert _reply(backend, prompt, temperature=1.0, top_k=1, max_new_tokens=12)[0] == greedy
    sampled = {"temperature": 1.5, "top_p": 0.95, "max_new_tokens": 12}
    assert _reply(backend, prompt, seed=1, **sampled)[0] == _reply(backend, prompt, seed=1, **sampled)[0]
    _, stream = _reply(backend, prompt, temperature=1.5, min_new_tokens=10, max_new_tokens=10)
    assert stream.stats.new_tokens == 10 and stream.finish == "length"


def test_context_limit_is_max_len(backend):
    assert backend.info.context_length == MAX_LEN
    prompt = [5] * (MAX_LEN - 3)
    _, stream = _reply(backend, prompt, temperature=0.0, min_new_tokens=50, max_new_tokens=50)
    assert stream.stats.new_tokens == 3 and stream.finish == "length"
    with pytest.raises(ChatError, match="holds 64"):
        backend.prefill([5] * (MAX_LEN + 1))
    backend.prefill([5] * MAX_LEN)
    with pytest.raises(ChatError, match="context is full"):
        backend.decode(5)


def test_loads_without_transformers(llama_artifact):
    code = (
        "import sys; from chat.backends.torchscript_backend import TorchScriptBackend as B; "
        f"b = B({str(llama_artifact)!r}); b.prefill([3, 4, 5]); b.decode(6); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert "Warning" not in done.stderr  # TorchScript's deprecation warnings stay hidden


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA graph replay of the decode step")
def test_cuda_graph_decode_matches_plain_decode(tiny_llama, tmp_path):
    artifact = export(str(tiny_llama), tmp_path / "cuda", device="cuda", max_len=256)
    graphed, plain = TorchScriptBackend(artifact), TorchScriptBackend(artifact, cuda_graphs=False)
    assert graphed._graphs and not plain._graphs
    ids = list(range(3, 43))
    torch.testing.assert_close(graphed.prefill(ids), plain.prefill(ids))
    for n in range(200):  # crosses from the 128-token bucket into the 256-token one
        token = (n * 13) % 280 + 3
        a, b = graphed.decode(token).cpu(), plain.decode(token).cpu()
        assert int(a.argmax()) == int(b.argmax()), f"step {n}"
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=f"step {n}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graphs captured in the chat's load thread")
def test_cuda_graphs_captured_in_a_load_thread_replay_in_the_main_thread(tiny_llama, tmp_path):
    import threading

    artifact = export(str(tiny_llama), tmp_path / "cuda", device="cuda", max_len=256)
    loaded = {}
    thread = threading.Thread(target=lambda: loaded.update(backend=TorchScriptBackend(artifact)))
    thread.start()  # as the interactive chat loads (chat.loading.SessionLoad)
    thread.join()
    graphed, plain = loaded["backend"], TorchScriptBackend(artifact, cuda_graphs=False)
    assert graphed._graphs
    ids = list(range(3, 43))
    torch.testing.assert_close(graphed.prefill(ids), plain.prefill(ids))
    for n in range(150):
        token = (n * 13) % 280 + 3
        a, b = graphed.decode(token).cpu(), plain.decode(token).cpu()
        assert int(a.argmax()) == int(b.argmax()), f"step {n}"


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory):
    """A tiny llama whose own context is 16384 tokens, exported with the default (the model's) context."""
    from conftest import build_model
    from transformers import AutoConfig, AutoModelForCausalLM

    source = build_model(tmp_path_factory.mktemp("long-llama"), "llama")
    config = AutoConfig.from_pretrained(source)
    config.max_position_embeddings = 16384
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(source)
    return source, export(str(source), tmp_path_factory.mktemp("ts") / "long")


def test_the_context_is_the_models_own_and_the_cache_grows_with_the_chat(long_llama):
    """A ~6000-token prompt runs as transformers runs it; the cache starts small and doubles to fit it."""
    from transformers import AutoModelForCausalLM

    from chat.backends.torchscript_backend import FIRST_CACHE

    source, artifact = long_llama
    backend = TorchScriptBackend(artifact)
    try:
        assert backend.info.context_length == 16384 and backend.cache_positions == FIRST_CACHE
        ids = [(7 * i + 3) % 290 + 3 for i in range(6000)]
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        with torch.inference_mode():
            expected = hf.generate(
                torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=0
            )[0, len(ids) :].tolist()
            logits = backend.prefill(ids)
            assert torch.allclose(logits, hf(torch.tensor([ids])).logits[0, -1], atol=1e-4)
        assert backend.cache_positions == 8192 == getattr(backend.module.blocks, "1").attention.k_cache.size(2)
        got = []
        for _ in range(8):
            got.append(int(logits.argmax()))
            logits = backend.decode(got[-1])
        assert got == expected
    finally:
        backend.close()


def test_decode_across_a_cache_growth_keeps_every_key(long_llama):
    """Growing mid-reply copies the cached keys: decode steps on each side of the growth equal transformers'."""
    from transformers import AutoModelForCausalLM

    from chat.backends.torchscript_backend import FIRST_CACHE

    source, artifact = long_llama
    backend = TorchScriptBackend(artifact)
    try:
        ids = [(5 * i + 1) % 290 + 3 for i in range(FIRST_CACHE - 3)]
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        with torch.inference_mode():
            expected = hf.generate(
                torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0
            )[0, len(ids) :].tolist()
            logits, got = backend.prefill(ids), []
            for _ in range(6):
                got.append(int(logits.argmax()))
                logits = backend.decode(got[-1])
        assert got == expected and backend.cache_positions == 2 * FIRST_CACHE
    finally:
        backend.close()
