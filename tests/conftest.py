"""Shared fixtures: small real models with random weights, built from a config (no download)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Models exported on first use go to a cache of this test run's own, never the user's.
os.environ["CHAT_ARTIFACTS_DIR"] = tempfile.mkdtemp(prefix="chat-test-artifacts-")

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "models" / "smollm2-135m-instruct"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. Hello, how are you today? I am fine, thank you.",
    "Tokens, models and chats: a small corpus for a small byte-level tokenizer.",
    "User: What is two plus two?\nAssistant: Four. Numbers 0123456789 and symbols !?.,;:'\"()[]{}",
]


def build_tokenizer(directory: Path, *, chat_template: str | None, eos: str) -> int:
    """Train a tiny byte-level BPE tokenizer and save it as transformers does; return its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)
    return tok.get_vocab_size()


def build_model(directory: Path, kind: str) -> Path:
    import torch
    from helpers import TINY_DECODER  # here, not at the top: HF_HUB_OFFLINE must be set before chat imports
    from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, LlamaConfig

    directory.mkdir(parents=True, exist_ok=True)
    if kind == "llama":
        vocab = build_tokenizer(directory, chat_template=CHATML, eos="<|im_end|>")
        config = LlamaConfig(
            vocab_size=vocab,
            **TINY_DECODER,
            head_dim=16,
            tie_word_embeddings=True,
            rope_theta=10000.0,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=0,
        )
        eos_id = 2
    else:
        vocab = build_tokenizer(directory, chat_template=None, eos="<|endoftext|>")
        config = GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0
        )
        eos_id = 0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    GenerationConfig(eos_token_id=eos_id, bos_token_id=0).save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def no_neighbours(monkeypatch):
    """No /proc readings in tests, as on macOS: the thread count stays one per CPU, not one that follows this
    machine's other work from load to load. tests/test_threads.py hands chat.threads readings of its own."""
    monkeypatch.setattr("chat.threads.read_cpu_times", lambda cpus: None)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer llama-shaped model with a ChatML template and random weights."""
    return build_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with no chat template and random weights."""
    return build_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def llama_artifact(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama exported to TorchScript for the CPU in float32."""
    from helpers import ARTIFACT_MAX_LEN

    from chat.export import export

    return export(str(tiny_llama), tmp_path_factory.mktemp("ts") / "llama", max_len=ARTIFACT_MAX_LEN)


@pytest.fixture(scope="session")
def int8_artifact(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama exported for the CPU in float32 with int8 matmul weights (--quantize int8)."""
    from helpers import ARTIFACT_MAX_LEN

    from chat.export import export

    return export(str(tiny_llama), tmp_path_factory.mktemp("ts") / "int8", max_len=ARTIFACT_MAX_LEN, quantize="int8")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The real demo model; `make test` fetches it first, so in CI this never skips."""
    if not (DEMO_MODEL / ".complete").is_file():
        pytest.skip("demo model not fetched: run `make demo-model`")
    return DEMO_MODEL
