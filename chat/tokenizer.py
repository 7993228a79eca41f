"""A chat tokenizer from a model directory using only `tokenizers` and jinja2 (no transformers), so
the TorchScript path and the standalone bundle stay small. Chat templates render as transformers
renders them: a sandboxed jinja2 environment with the same helpers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from chat.backends.base import Message
from chat.errors import ChatError
from chat.jsonfile import MODEL_CONFIG_MAX_BYTES, JSONFileError, NoSuchFile, read_json


def read_config(path: Path) -> dict[str, Any]:
    """One of the model's JSON files, or {} when the model has none."""
    try:
        return read_json(path, "a model config file", MODEL_CONFIG_MAX_BYTES)
    except NoSuchFile:
        return {}
    except JSONFileError as why:
        raise ChatError(f"{why}; restore or re-create it") from None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # older configs store AddedToken dicts
        value = value.get("content")
    return value if isinstance(value, str) else None


def find_chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja, chat_template.json or tokenizer_config.json."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = read_config(directory / "chat_template.json").get("chat_template")
    template = template or tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def eos_ids_from_configs(
    generation_config: dict[str, Any], model_config: dict[str, Any], extra: Sequence[int] = ()
) -> set[int]:
    ids: set[int] = set(extra)
    for config in (generation_config, model_config):
        value = config.get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


@lru_cache(maxsize=8)
def compile_template(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators=None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_template(template: str, messages: list[Message], special_tokens: dict[str, str]) -> str:
    import jinja2

    try:
        return compile_template(template).render(messages=messages, add_generation_prompt=True, **special_tokens)
    except jinja2.exceptions.TemplateError as why:
        raise ChatError(f"the model's chat template refused these messages: {why}") from None


class FastTokenizer:
    """tokenizer.json + tokenizer_config.json (+ chat template, generation_config.json)."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ChatError(f"{directory} has no tokenizer.json; re-export the model or use --backend transformers")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as why:  # tokenizers raises a bare Exception on bad files
            raise ChatError(f"{path} could not be read ({why}); re-export the model") from None
        config = read_config(directory / "tokenizer_config.json")
        self.template = find_chat_template(directory, config)
        self.special_tokens = {
            key: text
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(config.get(key))) is not None
        }
        extra = []
        if (eos := self.special_tokens.get("eos_token")) and (eos_id := self._tok.token_to_id(eos)) is not None:
            extra.append(eos_id)
        self.eos_token_ids = eos_ids_from_configs(
            read_config(directory / "generation_config.json"), read_config(directory / "config.json"), extra
        )

    @property
    def has_chat_template(self) -> bool:
        return self.template is not None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def render(self, messages: list[Message]) -> str:
        if self.template is None:
            raise ChatError("this model has no chat template")
        return render_template(self.template, messages, self.special_tokens)
