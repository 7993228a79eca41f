"""Turn the conversation into prompt tokens that fit the model's context."""

from __future__ import annotations

from dataclasses import dataclass

from chat.backends.base import ChatTokenizer, Message
from chat.conversation import Conversation
from chat.errors import ChatError


@dataclass
class Prompt:
    ids: list[int]
    stop_strings: list[str]
    dropped: int = 0  # exchanges dropped from the context to make room


def render_plain(messages: list[Message], user_label: str) -> str:
    """A transcript for models without a chat template (gpt2 and other base models)."""
    lines = []
    for message in messages:
        if message["role"] == "system":
            lines.append(message["content"] + "\n")
        else:
            label = user_label if message["role"] == "user" else "Assistant"
            lines.append(f"{label}: {message['content']}")
    lines.append("Assistant:")
    return "\n".join(lines)


def plain_stop_strings(user_label: str) -> list[str]:
    # Without them a base model goes on to write the user's next turn.
    return sorted({f"\n{user_label}:", "\nUser:", "\nAssistant:"})


def encode(tokenizer: ChatTokenizer, messages: list[Message], user_label: str) -> list[int]:
    if tokenizer.has_chat_template:
        # The template writes the special tokens (BOS and so on) itself.
        return tokenizer.encode(tokenizer.render(messages), add_special_tokens=False)
    return tokenizer.encode(render_plain(messages, user_label), add_special_tokens=True)


def build_prompt(
    tokenizer: ChatTokenizer,
    conversation: Conversation,
    *,
    context_length: int,
    max_new_tokens: int,
    policy: str,
    user_label: str,
) -> Prompt:
    """The prompt for the conversation's next reply, within `context_length - max_new_tokens` tokens.

    drop-oldest moves the conversation's context start past old exchanges (they stay in the
    conversation and in saved files); error refuses and says how to make room.
    """
    budget = context_length - max_new_tokens
    if budget <= 0:
        raise ChatError(
            f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in this model's "
            f"{context_length}-token context; lower it (--max-new-tokens N, or !set max_new_tokens=N in the chat)"
        )
    stops = [] if tokenizer.has_chat_template else plain_stop_strings(user_label)
    dropped, start = 0, conversation.context_start
    while True:
        ids = encode(tokenizer, conversation.in_context(), user_label)
        if len(ids) <= budget:
            return Prompt(ids, stops, dropped)
        if policy == "error" and len(conversation.messages) - conversation.context_start > 1:
            raise ChatError(
                f"the conversation is {len(ids)} tokens, over the {budget} this model has room for "
                f"(context {context_length} - max_new_tokens {max_new_tokens}); "
                "use !undo or !clear, lower max_new_tokens, or run with --context-policy drop-oldest"
            )
        if not conversation.drop_oldest_exchange():
            conversation.context_start = start  # the message is refused: keep the history as it was
            raise ChatError(
                f"this message makes a prompt of {len(ids)} tokens, over the {budget} this model has room for "
                f"(context {context_length} - max_new_tokens {max_new_tokens}); shorten it"
                + (" or the system prompt" if conversation.system else "")
            )
        dropped += 1
