"""Where a model named on the command line lives: a local directory, a GGUF file, or a Hugging Face Hub snapshot.

No torch here: the interactive chat resolves (and, if need be, downloads) a Hub model before its prompt,
with progress shown, then loads it in the background (chat.loading.SessionLoad).
"""

from __future__ import annotations

from pathlib import Path

from chat.backends.base import LoadOptions
from chat.errors import ChatError, UsageError, file_error

GGUF_MAGIC = b"GGUF"  # the first bytes of every GGUF file (llama.cpp's format)


def is_gguf(path: Path) -> bool:
    """Whether path is a GGUF file, by its first bytes; a file named *.gguf that is not one is a UsageError."""
    if not path.is_file():
        return False
    named = path.suffix.lower() == ".gguf"
    try:
        with path.open("rb") as file:
            magic = file.read(len(GGUF_MAGIC))
    except OSError as why:
        if named:
            raise UsageError(f"cannot read the GGUF file {file_error(why)}") from None
        return False
    if magic != GGUF_MAGIC and named:
        raise UsageError(f"{path} is not a GGUF file (it does not start with GGUF); check it, or download it again")
    return magic == GGUF_MAGIC


def locate_model(options: LoadOptions) -> Path:
    """Where the model is: the directory or GGUF file named, or a Hub snapshot (downloaded unless offline)."""
    path = Path(options.model).expanduser()
    if path.is_dir():
        return path
    if is_gguf(path):
        return path.resolve()
    if path.exists():
        raise UsageError(
            f"{options.model} is a file; name the model's directory (the one with config.json) or a GGUF file"
        )
    if path.suffix.lower() == ".gguf":
        raise UsageError(f"GGUF file {options.model} does not exist; check the path")
    if options.model.startswith((".", "/", "~")) or options.model.count("/") > 1:
        raise UsageError(f"model directory {options.model} does not exist; check the path")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    # Only what loading needs: safetensors weights, or the older *.bin where a model has no safetensors.
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
    try:
        path = Path(snapshot_download(options.model, allow_patterns=patterns, local_files_only=options.offline))
        if not any(path.glob("*.safetensors")):
            path = Path(
                snapshot_download(options.model, allow_patterns=[*patterns, "*.bin"], local_files_only=options.offline)
            )
        return path
    except RepositoryNotFoundError:
        raise ChatError(
            f"no model '{options.model}' on the Hugging Face Hub (or it is private: run `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        if options.offline:
            raise ChatError(
                f"'{options.model}' is not in the local Hugging Face cache and offline mode is on; "
                "run once online, or name a local directory"
            ) from None
        # huggingface_hub raises this too when the Hub cannot be reached and nothing is cached.
        raise ChatError(
            f"could not reach the Hugging Face Hub to download '{options.model}', and it is not in the local cache; "
            "check the network (or HF_ENDPOINT, HTTPS_PROXY), or name a local directory"
        ) from None
    except (HfHubHTTPError, OSError) as why:
        raise ChatError(f"could not download '{options.model}' ({why}); check the network or use --offline") from None
    except ValueError as why:  # an invalid repo id
        raise UsageError(f"'{options.model}' is neither a directory nor a Hub model id ({why})") from None
