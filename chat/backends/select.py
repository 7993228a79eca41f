"""Choose and load a backend for the user's model and options."""

from __future__ import annotations

from chat.backends.base import Backend, LoadOptions
from chat.errors import UsageError


def load_backend(options: LoadOptions, choice: str = "auto") -> Backend:
    """Load the model with the chosen backend; raise ChatError with one line saying what to do."""
    if choice == "torchscript":
        raise UsageError("the torchscript backend is not available yet; use --backend transformers")
    from chat.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(options)
    backend.info.reason = "asked for with --backend transformers" if choice == "transformers" else "auto"
    return backend
