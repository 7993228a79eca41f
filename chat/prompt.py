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
    reply_room: int  # the most tokens the reply may have: max_new_tokens, or less when the prompt leaves less
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
    min_new_tokens: int = 0,
) -> Prompt:
    """The prompt for the conversation's next reply, with `max_new_tokens` of room after it where it can.

    drop-oldest moves the conversation's context start past as few old exchanges as make room (they stay in
    the conversation and in saved files); error refuses and says how to make room. When the newest message
    alone leaves less room than max_new_tokens, the reply is capped at what is left; a prompt is refused only
    when it leaves no room for min_new_tokens (and at least one token).
    """
    budget = context_length - max_new_tokens
    most = context_length - max(1, min_new_tokens)  # the longest prompt a reply can follow
    stops = [] if tokenizer.has_chat_template else plain_stop_strings(user_label)
    starts = conversation.context_starts()
    tried: dict[int, list[int]] = {}  # index into starts -> the prompt from there

    def fits(index: int) -> bool:
        tried[index] = encode(tokenizer, conversation.in_context(starts[index]), user_label)
        return len(tried[index]) <= budget

    # Each later start leaves out more messages, so the starts that fit are a tail of `starts`: bisection finds
    # where it begins, rendering O(log n) times (good == len(starts): none fits).
    if fits(0):
        bad, good = -1, 0
    elif policy == "error" and len(conversation.messages) - conversation.context_start > 1:
        raise ChatError(
            f"the conversation is {len(tried[0])} tokens, over the {max(budget, 0)} this model has room for "
            f"(context {context_length} - max_new_tokens {max_new_tokens}); "
            "use !undo or !clear, lower max_new_tokens, or run with --context-policy drop-oldest"
        )
    else:
        bad, good = 0, len(starts)
    while good - bad > 1:
        middle = (bad + good) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    chosen = min(good, len(starts) - 1)  # none fits: the newest message alone, its reply capped
    ids = tried[chosen]
    if len(ids) > most:
        room = f"min_new_tokens {min_new_tokens}" if min_new_tokens > 1 else "1 token for the reply"
        raise ChatError(
            f"this message makes a prompt of {len(ids)} tokens, over the {max(most, 0)} this model has room for "
            f"(context {context_length} - {room}); shorten it"
            + (" or the system prompt" if conversation.system else "")
            + (", or lower min_new_tokens" if min_new_tokens > 1 else "")
        )
    conversation.context_start = starts[chosen]
    return Prompt(ids, stops, reply_room=min(max_new_tokens, context_length - len(ids)), dropped=chosen)
