"""The real demo model (SmolLM2-135M-Instruct), as a user runs it. `make test` fetches it first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.demo
QUESTION = "What is the capital of France?"


def chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.parametrize("backend", ["auto", "transformers"])
def test_piped_question_answers_paris(demo_model, backend):
    result = chat(str(demo_model), "--temperature", "0", "--backend", backend, stdin=QUESTION + "\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and result.stdout.count("\n") == 1


def test_default_model_is_the_demo(demo_model):
    result = chat("--temperature", "0", "--prompt", QUESTION)
    assert result.returncode == 0 and "Paris" in result.stdout


def test_multi_turn_sends_the_history(demo_model):
    stdin = "Remember the number 42.\nWhat number did I ask you to remember?\n"
    result = chat(str(demo_model), "--temperature", "0", "--max-new-tokens", "20", "--verbose", stdin=stdin)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 2
    first, second = [line.split() for line in result.stderr.splitlines() if line.startswith("prompt ")]
    # The second prompt holds the first exchange: its prompt, its reply and the new message.
    assert int(second[1]) > int(first[1]) + int(first[4])


def test_chat_template_matches_transformers(demo_model):
    from transformers import AutoTokenizer

    from chat.tokenizer import FastTokenizer

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": QUESTION},
    ]
    ours = FastTokenizer(demo_model)
    theirs = AutoTokenizer.from_pretrained(demo_model)
    text = ours.render(messages)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    assert ours.eos_token_ids == {2}
