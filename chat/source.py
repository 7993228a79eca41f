"""The model the user named, resolved once before it loads: a server's model, or where its files are here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chat.options import Options


@dataclass(frozen=True)
class ModelSource:
    name: str  # as the user named it: what labels, !status and saved chats show ("" for a server's only model)
    path: str | None = None  # the local directory or GGUF file, once located (a Hub snapshot); None: not yet
    base_url: str | None = None  # the OpenAI-compatible server that serves it, for a remote model

    @property
    def remote(self) -> bool:
        return self.base_url is not None

    @property
    def local(self) -> str:
        """What to load: the located path, else the name as given (a directory, a file or a Hub id)."""
        return self.path or self.name


def resolve_model(options: Options, locate: bool) -> ModelSource:
    """The model of these options. locate: find a Hub model now (downloading it, with progress, unless
    offline), and a GGUF file's full path; a local directory is taken as named."""
    if options.base_url is not None:
        return ModelSource(options.model, base_url=options.base_url)
    if not locate or Path(options.model).expanduser().is_dir():
        return ModelSource(options.model)
    from chat.backends.base import LoadOptions
    from chat.backends.hub import locate_model

    return ModelSource(options.model, str(locate_model(LoadOptions(model=options.model, offline=options.offline))))
