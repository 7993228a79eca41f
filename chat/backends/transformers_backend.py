"""The transformers backend: any causal LM that transformers can load (a model directory, a Hub snapshot or
a GGUF file), with its own KV cache."""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Sequence
from pathlib import Path

import torch

from chat.backends.base import BackendInfo, LoadOptions, Message, common_prefix
from chat.backends.hub import is_gguf, locate_model
from chat.errors import ChatError, UsageError
from chat.jsonfile import MODEL_CONFIG_MAX_BYTES, JSONFileError, NoSuchFile, read_json
from chat.threads import StartingThreads

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds memory and keeps Ctrl+C responsive


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu")
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class HFTokenizer:
    """transformers' AutoTokenizer behind the ChatTokenizer protocol."""

    def __init__(self, tokenizer, eos_token_ids: set[int]):
        self._tok = tokenizer
        self.eos_token_ids = eos_token_ids

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def render(self, messages: list[Message]) -> str:
        try:
            return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as why:  # jinja raises TemplateError from the template's own checks
            raise ChatError(f"the model's chat template refused these messages: {why}") from None


def check_model_dir(path: Path, trust_remote_code: bool) -> dict:
    """Read config.json and fail early, in one line, on what transformers would fail on later."""
    config_path = path / "config.json"
    try:
        config = read_json(config_path, "a model config", MODEL_CONFIG_MAX_BYTES)
    except NoSuchFile:
        raise ChatError(f"{path} has no config.json; is this a Hugging Face model directory?") from None
    except JSONFileError as why:
        raise ChatError(f"{why}; re-download or re-create the model") from None
    try:  # transformers reads it with the weights, and blames them for a file it cannot use
        read_json(path / "generation_config.json", "a generation config", MODEL_CONFIG_MAX_BYTES)
    except NoSuchFile:
        pass  # transformers takes the generation settings from config.json
    except JSONFileError as why:
        raise ChatError(f"{why}; re-download or re-create the model") from None
    if "model_type" not in config:
        raise ChatError(f"{config_path} names no model_type; is this a Hugging Face causal LM?")
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if "AutoModelForCausalLM" in (config.get("auto_map") or {}):
            if not trust_remote_code:
                raise ChatError(f"{path} needs its own Python code to run; if you trust it, add --trust-remote-code")
        else:
            raise ChatError(
                f"transformers {transformers.__version__} has no causal LM for model type '{model_type}'; "
                "upgrade transformers (pip install -U transformers) or pick another model"
            )
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise ChatError(f"{path} has no weights (*.safetensors or *.bin); download the model again")
    return config


# What transformers needs to read a GGUF file (from_pretrained refuses one without accelerate).
GGUF_PACKAGES = ("gguf", "accelerate")
# llama.cpp's names for architectures that transformers' GGUF loader knows by another (load_gguf_checkpoint
# renames them before it looks them up).
_GGUF_RENAMED = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}


def check_gguf(path: Path) -> str:
    """The architecture a GGUF file holds (its general.architecture); fail early, in one line, where the
    packages for GGUF are missing or transformers cannot read that architecture."""
    missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ChatError(f"reading a GGUF file needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    try:
        architecture = gguf_architecture(path)
    except Exception as why:  # a truncated or foreign file: struct, numpy and the readers raise many kinds
        raise ChatError(f"{path} could not be read as GGUF ({_short(why)}); download it again") from None
    if not transformers_reads_gguf(architecture):
        import transformers

        raise ChatError(
            f"{path} holds a '{architecture}' model, which transformers {transformers.__version__} cannot read "
            "from GGUF; upgrade transformers (pip install -U transformers) or use the model's safetensors checkpoint"
        )
    return architecture


def gguf_architecture(path: Path) -> str:
    """general.architecture from a GGUF file's metadata."""
    try:  # transformers 5's own reader leaves the vocabulary unread: 20 ms on the demo, where GGUFReader takes 4 s
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:
        return gguf_package_architecture(path)
    return str(read_gguf_metadata(str(path))[0]["general.architecture"])


def gguf_package_architecture(path: Path) -> str:
    """general.architecture read by the gguf package, for a transformers without a reader of its own."""
    from gguf import GGUFReader

    field = GGUFReader(path).get_field("general.architecture")
    if field is None:
        raise ValueError("no general.architecture in its metadata")
    return str(field.contents())


def transformers_reads_gguf(architecture: str) -> bool:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:  # newer transformers load some architectures on a second path, which keeps GGUF blocks packed
        from transformers.integrations.gguf import GGUF_ARCHS
    except ImportError:
        GGUF_ARCHS = {}
    # The legacy list is the keys of a config mapping, which has two entries that are not architectures.
    legacy = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    return architecture in GGUF_ARCHS or _GGUF_RENAMED.get(architecture, architecture) in legacy


def quiet_gguf_loading() -> None:
    """Silence the progress bar transformers' GGUF loader draws with its own tqdm, which
    transformers.logging.disable_progress_bar() does not reach."""
    from transformers import modeling_gguf_pytorch_utils as loader

    if not isinstance(loader.tqdm, functools.partial):
        loader.tqdm = functools.partial(loader.tqdm, disable=True)


def pretrained_source(path: Path) -> tuple[Path, dict[str, str]]:
    """The directory and extra from_pretrained arguments that load the model at path (a GGUF file, or not)."""
    if not is_gguf(path):
        return path, {}
    # The file's full path: a bare name is looked for in the working directory first, where another file of
    # that name may be.
    return path.parent, {"gguf_file": str(path)}


class TransformersBackend:
    def __init__(self, options: LoadOptions):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        path = locate_model(options)
        if is_gguf(path):
            check_gguf(path)
            quiet_gguf_loading()
            config = {}  # the settings come from the GGUF metadata, read by from_pretrained
        else:
            config = check_model_dir(path, options.trust_remote_code)
        device = resolve_device(options.device)
        dtype = resolve_dtype(options.dtype, device)
        threads = StartingThreads(options, device.type)
        torch.set_num_threads(threads.count)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source, gguf_file = pretrained_source(path)
        common = {"trust_remote_code": options.trust_remote_code, "local_files_only": True, **gguf_file}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **common)
        except Exception as why:
            raise ChatError(
                f"could not load the tokenizer of {path} ({_short(why)}); the model needs tokenizer files"
            ) from None
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **common)
        except ValueError as why:
            if "trust_remote_code" in str(why):
                raise ChatError(f"{path} needs its own Python code; if you trust it, add --trust-remote-code") from None
            raise ChatError(f"transformers cannot load {path} as a causal LM ({_short(why)})") from None
        except Exception as why:
            raise ChatError(
                f"could not load the weights of {path} ({_short(why)}); they may be truncated: download again"
            ) from None
        self.model = model.to(device).eval()
        eos = {*_ids(model.generation_config.eos_token_id), *_ids(config.get("eos_token_id"))}
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.tokenizer = HFTokenizer(tokenizer, eos)
        torch.set_num_threads(threads.settle())
        self.info = BackendInfo(
            name="transformers",
            model=options.model,
            path=str(path),
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            context_length=_context_length(model.config),
            threads=torch.get_num_threads(),
            threads_reason=threads.reason,
        )
        self._device = device
        self._cache_arg = cache_argument(model)
        self._cache = None
        self._cached: list[int] = []  # the token ids whose keys/values the cache holds

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        ids = list(ids)
        keep = common_prefix(self._cached, ids)
        if keep == len(ids):  # the whole prompt is cached: recompute the last token for its logits
            keep -= 1
        if keep < len(self._cached) and self._cache is not None:
            try:  # a negative count removes that many tokens, in every transformers version we support
                self._cache.crop(keep - len(self._cached))
                self._cached = self._cached[:keep]
            except (ValueError, RuntimeError):  # some caches (sliding windows) cannot roll back
                keep = 0
        if self._cache is None or keep == 0:
            from transformers import DynamicCache

            self._cache, self._cached, keep = DynamicCache(), [], 0
        logits = None
        for start in range(keep, len(ids), PREFILL_CHUNK):
            logits = self._forward(ids[start : start + PREFILL_CHUNK])
        return logits

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        return self._forward([token])

    def _forward(self, ids: list[int]) -> torch.Tensor:
        input_ids = torch.tensor([ids], device=self._device)
        try:
            cache = {self._cache_arg: self._cache}
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache)
        except BaseException:
            # An interrupted forward may have written part of the chunk into the cache: start over next time.
            self._cache, self._cached = None, []
            raise
        self._cached.extend(ids)
        return out.logits[0, -1]

    def close(self) -> None:
        self._cache = None
        del self.model


def cache_argument(model) -> str:
    """The name the model's forward takes its KV cache by: transformers 5 renamed past_key_values to cache,
    and older versions only know the former."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _ids(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value or [] if isinstance(v, int)]


def _context_length(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _short(why: BaseException) -> str:
    text = str(why).strip().splitlines()
    return (text[0] if text else type(why).__name__)[:200]
