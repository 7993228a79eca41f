"""Generation parameters: one definition shared by the command line, `!set` and saved sessions."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat.errors import UsageError
from chat.jsonfile import MODEL_CONFIG_MAX_BYTES, JSONFileError, read_json

# Where a parameter's value came from, when not from chat's defaults (shown by !status). Values given on
# the command line win over a loaded chat's; a later !set or !load wins over what came before.
FLAG = "command line"
LOADED = "loaded chat"
SET = "!set"
RECOMMENDED = "model's generation_config"
CHOSEN = (FLAG, LOADED, SET)  # the user's own choices: what a remote engine sends


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.7  # 0 means greedy
    top_k: int = 50  # 0 disables
    top_p: float = 0.95  # 1.0 disables
    repetition_penalty: float = 1.0  # 1.0 disables
    seed: int | None = None  # None: a fresh random seed each session

    def replace(self, **changes: Any) -> GenerationParams:
        new = dataclasses.replace(self, **changes)
        new.check()
        return new

    def check(self) -> None:
        if self.min_new_tokens > self.max_new_tokens:
            raise UsageError(
                f"min_new_tokens ({self.min_new_tokens}) is above max_new_tokens ({self.max_new_tokens}); "
                "lower one or raise the other"
            )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _int(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError("a whole number") from None
        if value < low or (high is not None and value > high):
            raise ValueError(f"a whole number from {low}" + (f" to {high}" if high is not None else " up"))
        return value

    return parse


def _float(low: float, high: float, *, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("a number") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            bound = f"above {low}" if low_open else f"from {low}"
            raise ValueError(f"a number {bound} to {high}")
        return value

    return parse


def _seed(text: str) -> int | None:
    if text.lower() in ("none", "random", ""):
        return None
    return _int(0, 2**63 - 1)(text)


# name -> (parser, one-line description for !help / !set)
PARSERS = {
    "max_new_tokens": (_int(1, 1_000_000), "most tokens in one reply"),
    "min_new_tokens": (_int(0, 1_000_000), "fewest tokens before the model may stop"),
    "temperature": (_float(0.0, 100.0), "randomness; 0 = greedy"),
    "top_k": (_int(0), "sample from the k likeliest tokens; 0 = all"),
    "top_p": (_float(0.0, 1.0, low_open=True), "nucleus sampling mass; 1 = off"),
    "repetition_penalty": (_float(0.0, 100.0, low_open=True), "penalise repeated tokens; 1 = off"),
    "seed": (_seed, "random seed; 'random' for a fresh one"),
}


def normalise_key(key: str) -> str:
    return key.strip().lower().replace("-", "_")


def parse_value(key: str, text: str) -> Any:
    """Parse one parameter from text; raise UsageError naming the key and what is allowed."""
    name = normalise_key(key)
    if name not in PARSERS:
        raise UsageError(f"unknown parameter '{key}'; known: {', '.join(PARSERS)}")
    parser, _ = PARSERS[name]
    try:
        return parser(text.strip())
    except ValueError as why:
        raise UsageError(f"{name} must be {why}, not '{text}'") from None


def parse_assignments(words: list[str]) -> dict[str, Any]:
    """Parse `key=value` words (all or nothing): a dict of checked values."""
    if not words:
        raise UsageError("usage: !set key=value [key=value ...]; keys: " + ", ".join(PARSERS))
    changes: dict[str, Any] = {}
    for word in words:
        key, sep, text = word.partition("=")
        if not sep:
            raise UsageError(f"'{word}' is not key=value; for example: !set temperature=0.5")
        changes[normalise_key(key)] = parse_value(key, text)
    return changes


def model_recommendations(directory: str | Path) -> dict[str, Any]:
    """Sampling values a model's generation_config.json recommends (when it samples at all).

    Values that do not pass our checks are ignored: they are advice, not the user's input.
    """
    try:
        config = read_json(Path(directory) / "generation_config.json", "a generation config", MODEL_CONFIG_MAX_BYTES)
    except JSONFileError:
        return {}
    if config.get("do_sample") is not True:
        return {}
    values = {}
    for key in ("temperature", "top_k", "top_p", "repetition_penalty"):
        if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool):
            with contextlib.suppress(UsageError):
                values[key] = parse_value(key, str(config[key]))
    return values
