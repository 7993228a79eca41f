"""Test helpers: a session on a real (tiny) model, writing into strings."""

from __future__ import annotations

import io
from pathlib import Path

from chat.backends.base import LoadOptions
from chat.backends.transformers_backend import TransformersBackend
from chat.chatfile import ChatFile
from chat.cli import parse_args
from chat.conversation import Conversation
from chat.local import LocalEngine
from chat.params import GenerationParams
from chat.screen import Screen
from chat.session import Session

ARTIFACT_MAX_LEN = 64  # the context of the tiny test artifacts
# The decoder shape of every tiny llama-like test model (the llama fixture, the other families' models).
TINY_DECODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
_BACKENDS: dict[str, TransformersBackend] = {}


def backend_for(model: Path) -> TransformersBackend:
    """One loaded backend per model for the whole test run (loading is the slow part)."""
    key = str(model)
    if key not in _BACKENDS:
        _BACKENDS[key] = TransformersBackend(LoadOptions(model=key, device="cpu"))
    return _BACKENDS[key]


def make_session(model: Path, *args: str, keep: bool = False) -> Session:
    """keep: the session keeps itself in a file as it goes (as a chat at a terminal does)."""
    options = parse_args([str(model), "--seed", "0", *args])
    conversation = Conversation(system=options.system)
    params = GenerationParams().replace(**options.param_changes)
    chat_file = ChatFile(options.keep_in) if keep else None
    backend = backend_for(model)
    engine = LocalEngine(backend, options.user)
    return Session(engine, options, conversation, params, Screen(io.StringIO(), io.StringIO()), chat_file=chat_file)


def output(session: Session) -> tuple[str, str]:
    """What the session wrote to stdout and stderr since the last call."""
    screen = session.screen
    out, err = screen.out.getvalue(), screen.err.getvalue()
    screen.out.seek(0), screen.out.truncate()
    screen.err.seek(0), screen.err.truncate()
    return out, err
