"""Fitting the conversation into the model's context: which history is kept (as the one-exchange-at-a-time loop
kept it, found in O(log n) renders), and a reply capped at the room the prompt leaves instead of a refusal."""

from __future__ import annotations

import copy
import io
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ARTIFACT_MAX_LEN, backend_for, make_session, output

from chat.backends.base import ChatTokenizer, Message
from chat.backends.torchscript_backend import TorchScriptBackend
from chat.cli import parse_args
from chat.commands import handle
from chat.conversation import Conversation
from chat.errors import ChatError
from chat.local import LocalEngine
from chat.params import GenerationParams
from chat.prompt import Prompt, build_prompt, encode
from chat.screen import Screen
from chat.session import Session

LAST_QUESTION = "how are you today?"  # the last message of chat_history's conversations
WORDS = ["the", "capital", "of", "Paris", "hello", "how", "are", "you", "fine", "thank", "tokens", "models"]


class CountingTokenizer:
    """A tokenizer that counts its encode calls (one per prompt rendered)."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer = tokenizer
        self.eos_token_ids = tokenizer.eos_token_ids
        self.encodes = 0

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer.has_chat_template

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        self.encodes += 1
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def render(self, messages: list[Message]) -> str:
        return self.tokenizer.render(messages)


def reference_prompt(
    tokenizer: ChatTokenizer, conversation: Conversation, context_length: int, max_new_tokens: int, policy: str
) -> tuple[list[int], int]:
    """The prompt ids and exchanges dropped, by dropping the oldest exchange and re-rendering until it fits."""
    budget = context_length - max_new_tokens
    dropped = 0
    while True:
        ids = encode(tokenizer, conversation.in_context(), "User")
        if len(ids) <= budget:
            return ids, dropped
        if policy == "error" and len(conversation.messages) - conversation.context_start > 1:
            raise ChatError(
                f"the conversation is {len(ids)} tokens, over the {budget} this model has room for "
                f"(context {context_length} - max_new_tokens {max_new_tokens}); "
                "use !undo or !clear, lower max_new_tokens, or run with --context-policy drop-oldest"
            )
        rest = conversation.messages[conversation.context_start :]
        later_users = [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]
        if not later_users:
            raise ChatError("refused")
        conversation.context_start += later_users[0]
        dropped += 1


def random_conversation(rng: random.Random) -> Conversation:
    """A conversation ending in a user message: varied lengths, sometimes a system prompt, an unanswered or
    interrupted turn, a first message from the assistant (other tools' files), a context start already moved."""

    def text() -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(1, 14)))

    conversation = Conversation(system=text() if rng.random() < 0.5 else None)
    if rng.random() < 0.2:
        conversation.add("assistant", text())
    for _ in range(rng.randint(0, 30)):
        conversation.add("user", text())
        if rng.random() < 0.9:
            conversation.add("assistant", text(), **({"interrupted": True} if rng.random() < 0.1 else {}))
    conversation.add("user", text())
    if rng.random() < 0.3:
        conversation.context_start = rng.choice(conversation.context_starts())
    return conversation


def chat_history(exchanges: int) -> Conversation:
    conversation = Conversation()
    for number in range(exchanges):
        conversation.add("user", f"hello {number}")
        conversation.add("assistant", "fine, thank you")
    conversation.add("user", LAST_QUESTION)
    return conversation


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("policy", ["drop-oldest", "error"])
def test_keeps_what_dropping_one_exchange_at_a_time_kept(model, policy, request):
    tokenizer = backend_for(request.getfixturevalue(model)).tokenizer
    rng = random.Random(f"{model} {policy}")
    for _ in range(60):
        conversation = random_conversation(rng)
        reference = copy.deepcopy(conversation)
        max_new_tokens = rng.choice([8, 64, 160, 200, 230])
        try:
            expected = reference_prompt(tokenizer, reference, 256, max_new_tokens, policy)
        except ChatError as why:
            expected = str(why)
        try:
            prompt = build_prompt(
                tokenizer,
                conversation,
                context_length=256,
                max_new_tokens=max_new_tokens,
                policy=policy,
                user_label="User",
            )
        except ChatError as why:
            assert str(why) == expected  # the error policy's refusal, word for word
            continue
        if expected == "refused":  # no history fits: the newest message alone, its reply capped
            starts = reference.context_starts()
            assert conversation.context_start == starts[-1] and prompt.reply_room < max_new_tokens
            assert prompt.ids == encode(tokenizer, conversation.in_context(), "User")
        else:
            assert (prompt.ids, prompt.dropped) == expected and prompt.reply_room == max_new_tokens
            assert conversation.context_start == reference.context_start


def test_renders_a_logarithmic_number_of_times(tiny_llama):
    tokenizer = CountingTokenizer(backend_for(tiny_llama).tokenizer)
    conversation = chat_history(500)
    prompt = build_prompt(
        tokenizer, conversation, context_length=256, max_new_tokens=32, policy="drop-oldest", user_label="User"
    )
    assert tokenizer.encodes <= 1 + math.ceil(math.log2(501))
    assert len(prompt.ids) <= 256 - 32 and prompt.dropped > 480
    # The most history that fits: one exchange more would not.
    longer = conversation.in_context(conversation.context_start - 2)
    assert len(encode(tokenizer, longer, "User")) > 256 - 32

    tokenizer.encodes = 0  # a conversation that fits is rendered once
    build_prompt(
        tokenizer, chat_history(2), context_length=256, max_new_tokens=32, policy="drop-oldest", user_label="User"
    )
    assert tokenizer.encodes == 1


NEWEST = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": LAST_QUESTION}]


def fitted(
    tokenizer: ChatTokenizer, context_length: int, *, policy: str = "drop-oldest", min_new_tokens: int = 0
) -> Prompt:
    """The prompt, with max_new_tokens over the context, for three exchanges and then NEWEST's message."""
    conversation = chat_history(3)
    conversation.system = NEWEST[0]["content"]
    return build_prompt(
        tokenizer,
        conversation,
        context_length=context_length,
        max_new_tokens=4000,
        policy=policy,
        user_label="User",
        min_new_tokens=min_new_tokens,
    )


def test_a_reply_is_capped_at_the_room_the_newest_message_leaves(tiny_llama):
    tokenizer = backend_for(tiny_llama).tokenizer
    alone = len(encode(tokenizer, NEWEST, "User"))
    capped = fitted(tokenizer, alone + 5)
    assert (capped.dropped, capped.reply_room, len(capped.ids)) == (3, 5, alone)
    assert fitted(tokenizer, alone + 1).reply_room == 1
    assert fitted(tokenizer, alone + 5, min_new_tokens=5).reply_room == 5
    with pytest.raises(ChatError, match=rf"prompt of {alone} tokens, over the {alone - 1} .*1 token for the reply"):
        fitted(tokenizer, alone)
    with pytest.raises(ChatError, match=r"\(context \d+ - min_new_tokens 6\); shorten it or the system prompt, or"):
        fitted(tokenizer, alone + 5, min_new_tokens=6)
    # The error policy still refuses a history that leaves too little room, but caps a message on its own.
    with pytest.raises(ChatError, match="use !undo or !clear, lower max_new_tokens"):
        fitted(tokenizer, alone + 5, policy="error")
    lone = Conversation(system=NEWEST[0]["content"], messages=[dict(NEWEST[1])])
    prompt = build_prompt(
        tokenizer, lone, context_length=alone + 5, max_new_tokens=4000, policy="error", user_label="User"
    )
    assert prompt.reply_room == 5


def test_set_max_new_tokens_near_the_context_caps_the_reply(llama_artifact):
    backend = TorchScriptBackend(llama_artifact)
    options = parse_args([str(llama_artifact), "--seed", "0", "--temperature", "1", "--top-k", "0"])
    screen = Screen(io.StringIO(), io.StringIO())
    session = Session(LocalEngine(backend, options.user), options, Conversation(), GenerationParams(), screen)
    try:
        handle(session, f"!set max_new_tokens={ARTIFACT_MAX_LEN - 4}")
        assert session.ask("hi")
        _, err = output(session)
        stats = session.last_stats
        room = ARTIFACT_MAX_LEN - stats.prompt_tokens
        assert 0 < room < ARTIFACT_MAX_LEN - 4 and stats.new_tokens <= room
        assert (
            f"(this reply can be at most {room} tokens: the prompt fills the rest of the model's "
            f"{ARTIFACT_MAX_LEN}-token context)" in err
        )
        assert "error" not in err and session.conversation.messages[-1]["role"] == "assistant"
    finally:
        backend.close()


def test_no_notice_when_the_reply_has_all_its_room(tiny_llama):
    session = make_session(tiny_llama, "--max-new-tokens", "4")
    assert session.ask("hi")
    assert "at most" not in output(session)[1]


def test_load_of_a_long_chat_answers(tiny_llama, tmp_path):
    saved = tmp_path / "long.json"
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"message number {i}"} for i in range(4000)]
    saved.write_text(json.dumps({"messages": messages}), encoding="utf-8")
    args = [str(tiny_llama), "--load", str(saved), "--prompt", "hi", "--max-new-tokens", "4"]
    done = subprocess.run(
        [sys.executable, "-m", "chat", *args, "--save-dir", str(tmp_path / "kept")],
        capture_output=True,
        text=True,
        timeout=120,  # a guard against the hang of re-rendering once per dropped exchange, not a timing
    )
    assert done.returncode == 0, done.stderr
    assert "oldest exchange(s) to fit the model's context" in done.stderr
    assert Path(saved).read_text(encoding="utf-8") == json.dumps({"messages": messages})  # --load left it alone
