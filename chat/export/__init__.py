"""Export a Hugging Face causal LM to a TorchScript artifact directory (see chat.artifact for the layout).

transformers is used here, at export time only: to read the weights, the RoPE table and (for --verify)
the reference tokens. The artifact is loaded later with torch and tokenizers alone.

torch is imported by the functions that use it, not by this package, so that `python -m chat.export --help`
answers at once.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from chat import native
from chat.artifact import MODEL_FILE, QUANTIZATIONS, is_artifact, sha256_file, write_manifest
from chat.errors import ChatError, UsageError

if TYPE_CHECKING:
    import torch

    from chat.lean.model import LeanLM

COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "config.json",
)
VERIFY_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a cache is.",
)
VERIFY_TOKENS = 32

Progress = Callable[[str], None]


def stderr_progress() -> Progress:
    started = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say


def export(
    model: str,
    outdir: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    max_len: int | None = None,
    quantize: str | None = None,
    verify: bool = False,
    progress: Progress = lambda message: None,
) -> Path:
    """Write the artifact of `model` (a directory, a GGUF file or a Hub id) to `outdir`, atomically; return outdir.
    quantize="int8": matmul weights as int8 with a scale per row; "int4": groups of 32 with a step and an offset
    each, bfloat16 only (chat.export.quantize; CPU only)."""
    import torch

    from chat.backends.base import LoadOptions
    from chat.backends.hub import is_gguf, locate_model
    from chat.backends.transformers_backend import (
        check_gguf,
        check_model_dir,
        pretrained_source,
        quiet_gguf_loading,
        resolve_device,
    )
    from chat.export.families import context_limit, convert, family_of
    from chat.lean.cache import allocate_cache
    from chat.lean.model import build, forms_for
    from chat.lean.ops import quiet_torchscript
    from chat.threads import StartingThreads

    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype={dtype}: use float32, bfloat16 or float16")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device={device}: use cpu or cuda")
    if quantize not in (None, *QUANTIZATIONS):
        raise UsageError(f"--quantize={quantize}: use int8 or int4 (or leave it out)")
    if quantize and device != "cpu":
        raise UsageError(
            f"--quantize {quantize} is for --device cpu (a GPU step is bound by kernel launches, not bytes)"
        )
    if quantize == "int4" and dtype != "bfloat16":
        raise UsageError("--quantize int4 is for --dtype bfloat16 (its kernels multiply bfloat16 activations)")
    torch_device = resolve_device(device)
    torch_dtype = getattr(torch, dtype)
    # As a chat does: on CPUs other programs keep busy, more threads than free CPUs make each op wait.
    threads = StartingThreads(None, torch_device.type)
    outdir = Path(outdir).expanduser().resolve()
    if outdir.exists() and not (is_artifact(outdir) or (outdir.is_dir() and not any(outdir.iterdir()))):
        raise UsageError(f"{outdir} exists and is not an artifact directory; name a new or empty directory")
    try:  # before the slow part: the artifact is written beside OUTDIR, then renamed
        outdir.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=outdir.parent).cleanup()
    except OSError as why:
        raise UsageError(f"cannot write in {outdir.parent} ({why.strerror or why}); pick another OUTDIR") from None

    source = locate_model(LoadOptions(model=model))
    gguf = is_gguf(source)
    # llama.cpp names each architecture we export as transformers names its model type.
    config = {"model_type": check_gguf(source)} if gguf else check_model_dir(source, trust_remote_code=False)
    family_of(str(config.get("model_type")))
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(threads.settle())
    if gguf:
        quiet_gguf_loading()
    progress(f"loading {source} with transformers" + (", its weights dequantized to float32" if gguf else ""))
    directory, gguf_file = pretrained_source(source)
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, local_files_only=True, **gguf_file
        ).eval()
    except Exception as why:  # transformers raises many kinds; the user needs one line
        first = (str(why).strip().splitlines() or [type(why).__name__])[0][:200]
        raise ChatError(f"transformers could not load {source} ({first}); check or download the model again") from None
    native_ops = torch_device.type == "cpu" and _native_kernels(progress)
    if quantize and not native_ops:
        raise ChatError(
            f"--quantize {quantize} decodes on chat's native kernels, which cannot run here ({native.why_not()})"
        )
    if quantize:
        from chat.export.quantize import quantize_weights, round_model_weights

        how = "one scale per row" if quantize == "int8" else "a step and an offset per 32 weights; the head int8"
        progress(f"rounding the matmul weights to {quantize}, {how}")
        round_model_weights(hf, quantize)  # --verify compares with transformers on these same weights
    max_len = context_limit(hf.config, max_len)
    shape, top, layers, ropes = convert(hf, max_len)
    if quantize:
        top, layers = quantize_weights(top, layers, quantize)

    progress(f"building the {shape.family} module: {shape.layers} layers, {dtype}, {device}, max_len {max_len}")

    converted: dict[int, torch.Tensor] = {}  # by source tensor, so tied weights stay one tensor in the file

    def cast(weights: dict) -> dict:
        for name, v in weights.items():
            if v is not None and id(v) not in converted:
                kept = v.dtype in (torch.int8, torch.uint8) or name.endswith("_scale")  # quantized, and scales
                converted[id(v)] = v.to(torch_device) if kept else v.to(device=torch_device, dtype=torch_dtype)
        return {k: None if v is None else converted[id(v)] for k, v in weights.items()}

    tables = [(cos.to(torch_device, torch_dtype), sin.to(torch_device, torch_dtype)) for cos, sin in ropes]
    forms = forms_for(shape, torch_dtype, torch_device, native_ops)
    lean = build(shape, cast(top), [cast(w) for w in layers], tables, forms, torch_dtype).eval()
    del top, layers

    outdir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    work.chmod(0o755)  # mkdtemp makes it private; an artifact is as readable as its model
    try:
        progress("tracing prefill and decode")
        traced = trace(lean, torch_dtype, torch_device)
        del lean
        progress(f"saving {MODEL_FILE}")
        allocate_cache(traced, shape, 0, torch_dtype, torch_device)  # the file holds weights, not an empty cache
        with quiet_torchscript():
            torch.jit.save(traced, str(work / MODEL_FILE))
        del traced
        if gguf:
            _write_gguf_files(source, hf, work)
        else:
            _copy_tokenizer(source, work)
        from chat.tokenizer import FastTokenizer

        progress("hashing files and writing the manifest")
        write_manifest(
            work,
            {
                "architecture": shape.family,
                "model_type": config.get("model_type"),
                "source": {"model": model, "path": str(source.resolve()), **_source_version(source)},
                "dtype": dtype,
                "device": torch_device.type,
                "max_len": max_len,
                "vocab_size": shape.vocab_size,
                "eos_token_ids": sorted(FastTokenizer(work).eos_token_ids),
                "shape": dataclasses.asdict(shape),
                "torch_version": torch.__version__,
                "ops": [native.OPS] if native_ops else [],
                "quantization": quantize,
                "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        if verify:
            verify_artifact(work, hf.to(torch_device, torch_dtype), progress)
        _replace(work, outdir)
    except OSError as why:  # a full disk, say: the old artifact, if any, stays as it was
        shutil.rmtree(work, ignore_errors=True)
        raise ChatError(f"could not write {outdir} ({why.strerror or why}); nothing was changed") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    progress(f"wrote {outdir}")
    return outdir


def _native_kernels(progress: Progress) -> bool:
    """Whether CPU decode can run on chat's native kernels, building them first if need be (once)."""
    reason = native.supported()
    if reason:
        progress(f"decode on torch's kernels: {reason}")
        return False
    if native.find_library() is None:
        progress("building chat's native CPU kernels (once, about 10 s)")
    if native.load():
        if built := native.take_built_note():
            progress(built)
        return True
    progress(f"decode on torch's kernels: {native.why_not()}")
    return False


def trace(lean: LeanLM, dtype: torch.dtype, device: torch.device) -> torch.jit.ScriptModule:
    """Trace prefill and decode into one module that shares the cache buffers."""
    import torch

    from chat.lean.cache import allocate_cache
    from chat.lean.ops import quiet_torchscript

    length = 32  # the cache is an attribute, not a traced constant: a chat gives it its own length
    allocate_cache(lean, lean.shape, length, dtype, device)
    positions = torch.arange(length, device=device)
    ids = torch.arange(3, 10, device=device) % lean.shape.vocab_size
    # Odd sizes, so no traced shape can collide with a constant; CUDA decode traces a bucket wider than the prefix.
    decode_window = positions[:16] if device.type == "cuda" else positions[:6]
    inputs = {
        "prefill": (ids, positions[3:10], positions[:10]),
        "decode": (ids[:1], positions[5:6], decode_window),
    }
    with torch.no_grad(), quiet_torchscript():
        return torch.jit.trace_module(lean, inputs, check_trace=False)


def verify_artifact(directory: Path, hf, progress: Progress) -> None:
    """Greedy tokens of the artifact against transformers (the model given, in the artifact's dtype and device).

    float32: the artifact runs freely and every token must be the same. bfloat16/float16: both follow
    transformers' greedy tokens (teacher forcing); a step where the artifact picks another token passes only
    when transformers' own logits call it a near tie (within 2 units in the last place of its top logit),
    since fused matmuls round differently in 16-bit. Raises ChatError on a failure."""
    import torch

    from chat.backends.torchscript_backend import TorchScriptBackend

    backend = TorchScriptBackend(directory)
    exact = backend.info.dtype == "float32"
    tolerance = 2 * torch.finfo(getattr(torch, backend.info.dtype)).eps
    try:
        for n, text in enumerate(VERIFY_PROMPTS, 1):
            tok = backend.tokenizer
            prompt = tok.render([{"role": "user", "content": text}]) if tok.has_chat_template else text
            ids = tok.encode(prompt, add_special_tokens=not tok.has_chat_template)
            reference, ref_logits = _hf_greedy(hf, ids, VERIFY_TOKENS)
            logits = backend.prefill(ids)
            near_ties = 0
            for step, expected in enumerate(reference):
                got = int(logits.argmax())
                if got != expected:
                    top = ref_logits[step]
                    gap = float(top[expected] - top[got])
                    if exact or gap > tolerance * float(top[expected].abs()):
                        raise ChatError(
                            f"verify failed: prompt {n} token {step}: artifact {got}, transformers {expected} "
                            f"(logit gap {gap:.4g}); do not use this artifact"
                        )
                    near_ties += 1
                logits = backend.decode(expected)
            note = f", {near_ties} near tie(s) within {backend.info.dtype} rounding" if near_ties else ""
            progress(f"verify: prompt {n}: {len(reference)} greedy tokens identical to transformers{note}")
    finally:
        backend.close()


def _hf_greedy(hf, ids: list[int], count: int) -> tuple[list[int], list[torch.Tensor]]:
    import torch
    from transformers import DynamicCache

    from chat.backends.transformers_backend import cache_argument

    device = next(hf.parameters()).device
    cache_arg = cache_argument(hf)
    cache = DynamicCache()
    step_ids = torch.tensor([ids], device=device)
    tokens, logits = [], []
    with torch.inference_mode():
        for _ in range(count):
            out = hf(input_ids=step_ids, use_cache=True, logits_to_keep=1, **{cache_arg: cache})
            row = out.logits[0, -1].float()
            tokens.append(int(row.argmax()))
            logits.append(row)
            step_ids = torch.tensor([[tokens[-1]]], device=device)
    return tokens, logits


def _copy_tokenizer(source: Path, work: Path) -> None:
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, work / name)
    if not (work / "tokenizer.json").is_file():  # only a slow tokenizer: let transformers write tokenizer.json
        from transformers import AutoTokenizer

        try:
            AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(work)
        except Exception as why:
            raise ChatError(f"{source} has no tokenizer.json and transformers could not make one ({why})") from None
        if not (work / "tokenizer.json").is_file():
            raise ChatError(f"{source}'s tokenizer has no fast (tokenizer.json) form; it cannot be exported yet")


def _write_gguf_files(source: Path, hf, work: Path) -> None:
    """The files a GGUF file's model needs in its artifact, which the GGUF holds as metadata: tokenizer.json,
    tokenizer_config.json and the chat template (by transformers' GGUF tokenizer), config.json and
    generation_config.json (eos ids and the model's settings)."""
    from transformers import AutoTokenizer

    from chat.backends.transformers_backend import pretrained_source

    directory, gguf_file = pretrained_source(source)
    try:
        AutoTokenizer.from_pretrained(directory, local_files_only=True, **gguf_file).save_pretrained(work)
    except Exception as why:
        first = (str(why).strip().splitlines() or [type(why).__name__])[0][:200]
        raise ChatError(f"transformers could not read the tokenizer of {source} ({first})") from None
    config = copy.deepcopy(hf.config)
    # Left in, quantization_config sends any later load of this config down transformers' GGUF path.
    for name in ("quantization_config", "_model_name_or_path"):  # and the GGUF's general.name is not a path
        if hasattr(config, name):
            delattr(config, name)
    config.architectures = [type(hf).__name__]  # as save_pretrained records it
    config.to_json_file(work / "config.json")
    hf.generation_config.save_pretrained(work)


def _source_version(source: Path) -> dict[str, str]:
    """The Hub revision when the source is a Hub snapshot, a GGUF file's sha256, else a sha256 over config and
    weight files."""
    if source.is_file():
        return {"sha256": sha256_file(source)}
    if source.parent.name == "snapshots":
        return {"revision": source.name}
    digest = hashlib.sha256()
    for path in sorted([source / "config.json", *source.glob("*.safetensors"), *source.glob("*.bin")]):
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return {"sha256": digest.hexdigest()}


def _replace(work: Path, outdir: Path) -> None:
    """Move the finished artifact into place; an older artifact there is replaced only after that succeeds."""
    old = None
    if outdir.exists():
        old = outdir.with_name(f".{outdir.name}.old-{int(time.time())}")
        outdir.rename(old)
    try:
        work.rename(outdir)
    except OSError:
        if old is not None:
            old.rename(outdir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
