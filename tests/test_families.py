"""The families the lean module exports next: qwen3, gemma3_text, gemma2, granite, olmo2 and smollm3.

A tiny random model of each is exported in float32, bfloat16 and int8 and must pass --verify. Its float32 artifact
must give transformers' logits after the prompt has gone past the sliding window, and transformers' greedy reply,
in three setups: chat's native kernels, the same ops running torch's code ($CHAT_NATIVE_ISA=torch), and an
artifact exported on torch's ops alone. Families that carry recurrent state are refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CHATML, build_tokenizer
from helpers import TINY_DECODER

from chat import native
from chat.artifact import read_manifest
from chat.backends.torchscript_backend import TorchScriptBackend
from chat.errors import ChatError
from chat.export import export

WINDOW = 8  # the sliding window of the Gemma models; every prompt below is longer than this
MAX_LEN = 128
SLIDING, FULL = "sliding_attention", "full_attention"
# Config values on top of TINY_DECODER. Each one makes a family's own semantics change the logits.
GEMMA = {
    "hidden_size": 80,
    "num_hidden_layers": 3,
    "head_dim": 16,
    "query_pre_attn_scalar": 24,
    "sliding_window": WINDOW,
    "layer_types": [SLIDING, FULL, SLIDING],
}
FAMILIES = {
    # q/k/v width 4*32 = 128 against hidden 64; per-head q/k RMSNorm before RoPE
    "qwen3": {"head_dim": 32},
    # hidden 80: sqrt(80) is not a bfloat16 number (unlike sqrt(64)); scaling by query_pre_attn_scalar, not head_dim;
    # sliding and full layers with their own RoPE bases (10k / 1M by default)
    "gemma3_text": GEMMA,
    # soft-capping small enough to act on these weights' attention logits (up to about 2) and final logits (about 3)
    "gemma2": {**GEMMA, "attn_logit_softcapping": 1.5, "final_logit_softcapping": 2.0},
    "granite": {
        "embedding_multiplier": 6.0,
        "attention_multiplier": 0.2,
        "residual_multiplier": 0.5,
        "logits_scaling": 4.0,
    },
    "olmo2": {},  # q/k norms over the whole projection width; post-norm blocks
    "smollm3": {"num_hidden_layers": 3, "no_rope_layers": [1, 0, 1]},  # 0: that layer has no RoPE
}
VARIANTS = ["float32", "bfloat16", "int8", "float32 on torch ops"]
KERNELS = ["native", "native ops on torch's code", "torch ops"]
# A prompt of token ids past several windows, then tokens fed one by one.
IDS = [(7 * i * i + 3 * i + 5) % 290 + 3 for i in range(32)]
PREFILL = 20


def build_family(directory: Path, model_type: str) -> Path:
    """A random model of `model_type` with the ChatML byte-level tokenizer of conftest. Norm weights are made
    random too: from_config leaves them at ones (zeros for Gemma's 1 + w), which would hide a wrong formula."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    directory.mkdir(parents=True)
    vocab = build_tokenizer(directory, chat_template=CHATML, eos="<|im_end|>")
    shape = {**TINY_DECODER, "initializer_range": 0.1, **FAMILIES[model_type]}  # 0.1: attention far from uniform
    config = AutoConfig.for_model(model_type, vocab_size=vocab, **shape, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(directory)
    GenerationConfig(eos_token_id=2, bos_token_id=0, pad_token_id=0).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, build_family(tmp_path_factory.mktemp("family") / request.param, request.param)


@pytest.fixture(scope="session")
def reference():
    """transformers' float32 model of a source directory, loaded once per run."""
    from transformers import AutoModelForCausalLM

    loaded = {}

    def load(source: Path):
        if source not in loaded:
            loaded[source] = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        return loaded[source]

    return load


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """One verified export per source and variant for the whole run: (artifact directory, export messages)."""
    made = {}

    def artifact(source: Path, variant: str) -> tuple[Path, list[str]]:
        if (source, variant) not in made:
            messages: list[str] = []
            out = tmp_path_factory.mktemp("art") / "art"
            options = {
                "float32": {},
                "bfloat16": {"dtype": "bfloat16"},
                "int8": {"quantize": "int8"},
                "float32 on torch ops": {},
            }[variant]
            with pytest.MonkeyPatch.context() as patch:
                if variant == "float32 on torch ops":  # as on a machine where the kernels do not run
                    patch.setattr(native, "supported", lambda: "turned off by the test")
                export(str(source), out, max_len=MAX_LEN, verify=True, progress=messages.append, **options)
            made[source, variant] = out, messages
        return made[source, variant]

    return artifact


def open_backend(artifacts, source: Path, kernels: str, monkeypatch) -> TorchScriptBackend:
    if kernels == "native ops on torch's code":
        monkeypatch.setenv("CHAT_NATIVE_ISA", "torch")  # read at each op call
    out, _ = artifacts(source, "float32 on torch ops" if kernels == "torch ops" else "float32")
    return TorchScriptBackend(out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_verifies(family, artifacts, variant):
    model_type, source = family
    if variant == "int8" and native.supported():
        pytest.skip(f"int8 decodes on chat's native kernels: {native.supported()}")
    out, messages = artifacts(source, variant)
    assert sum("32 greedy tokens identical" in m for m in messages) == 3, messages
    manifest = read_manifest(out)
    assert manifest["model_type"] == model_type and manifest["max_len"] == MAX_LEN
    assert manifest["dtype"] == ("bfloat16" if variant == "bfloat16" else "float32")
    assert manifest["quantization"] == ("int8" if variant == "int8" else None)
    if variant == "float32 on torch ops":
        assert manifest["ops"] == []


@pytest.mark.parametrize("kernels", KERNELS)
def test_float32_logits_past_the_window_are_transformers(family, artifacts, reference, kernels, monkeypatch):
    """Prefill longer than the window, then decode steps that slide it further: each step's logits are
    transformers' on the whole sequence, within float32 summing order."""
    _, source = family
    with torch.no_grad():
        expected = reference(source)(input_ids=torch.tensor([IDS])).logits[0]
    backend = open_backend(artifacts, source, kernels, monkeypatch)
    try:
        got = [backend.prefill(IDS[:PREFILL])] + [backend.decode(token) for token in IDS[PREFILL:]]
        for step, logits in enumerate(got, start=PREFILL - 1):
            torch.testing.assert_close(logits.float(), expected[step], rtol=1e-4, atol=1e-4, msg=f"position {step}")
    finally:
        backend.close()


@pytest.mark.parametrize("kernels", KERNELS)
def test_float32_greedy_reply_is_transformers(family, artifacts, reference, kernels, monkeypatch):
    _, source = family
    backend = open_backend(artifacts, source, kernels, monkeypatch)
    try:
        tok = backend.tokenizer
        prompt = tok.render([{"role": "user", "content": "Hello, how are you today? Tell me about Paris."}])
        ids = tok.encode(prompt, add_special_tokens=False)
        assert len(ids) > 2 * WINDOW
        with torch.no_grad():
            generated = reference(source).generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=20,
                do_sample=False,
            )
        expected = generated[0, len(ids) :].tolist()
        reply, logits = [], backend.prefill(ids)
        while len(reply) < 20:
            reply.append(int(logits.argmax()))
            if reply[-1] in tok.eos_token_ids:
                break
            logits = backend.decode(reply[-1])
        assert reply == expected
        assert tok.decode(reply) == tok.decode(expected)
    finally:
        backend.close()


RECURRENT = {
    "lfm2": {"layer_types": ["conv", FULL]},
    "qwen3_next": {
        "num_hidden_layers": 4,  # 3 linear-attention layers, then a full one
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
    },
}


@pytest.mark.parametrize("model_type", list(RECURRENT))
def test_a_family_with_recurrent_state_is_refused_in_one_line(tmp_path, model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    source = tmp_path / model_type
    vocab = build_tokenizer(tmp_path / "tok", chat_template=CHATML, eos="<|im_end|>")
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, **{**TINY_DECODER, **RECURRENT[model_type]}, eos_token_id=2, pad_token_id=0
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    for path in (tmp_path / "tok").iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ChatError) as refused:
        export(str(source), tmp_path / "out", max_len=64)
    message = str(refused.value)
    assert "\n" not in message and model_type in message and "transformers" in message
    assert not (tmp_path / "out").exists()


def test_cuda_forms_give_transformers_logits_on_cpu(family, reference):
    """The module as built for CUDA (fused norms, decode over a masked bucket of the cache, windows in the
    mask), traced and run on the CPU: GPU machines are rare, so its arithmetic is checked on every run."""
    from chat.export import trace
    from chat.export.families import convert
    from chat.lean.model import Forms, build

    _, source = family
    hf = reference(source)
    shape, top, layers, ropes = convert(hf, 64)
    module = trace(
        build(shape, top, layers, ropes, Forms(cuda=True), torch.float32).eval(), torch.float32, torch.device("cpu")
    )
    positions = torch.arange(32)  # the traced cache's length: decode attends over all of it, masked
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([IDS[: PREFILL + 1]])).logits[0]
        prefill = module.prefill(torch.tensor(IDS[:PREFILL]), positions[:PREFILL], positions[:PREFILL])
        decode = module.decode(torch.tensor(IDS[PREFILL : PREFILL + 1]), positions[PREFILL : PREFILL + 1], positions)
    torch.testing.assert_close(prefill, expected[PREFILL - 1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decode, expected[PREFILL], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_export_verifies(family, tmp_path):
    _, source = family
    messages: list[str] = []
    export(str(source), tmp_path / "cuda", device="cuda", max_len=MAX_LEN, verify=True, progress=messages.append)
    assert sum("32 greedy tokens identical" in m for m in messages) == 3, messages
