#!/usr/bin/env python3
"""Benchmark the TorchScript backend on the newer families, and at long context, against transformers (CPU).

Usage:
  bench_families.py [--families=LIST] [--contexts=LIST] [--repeats=N] [--long-repeats=N] [--prompt=N]
                    [--new-tokens=N] [--steps=N] [--no-int8] [--long-backends=LIST] [--tiny] [--tokenizer=DIR]
                    [--long-model=DIR] [--cache=DIR] [--out=DIR]
  bench_families.py --worker=WHAT --model=DIR --device=DEVICE --dtypes=DTYPE --prompts=N --new-tokens=N
                    --repeats=N
  bench_families.py (-h | --help)

Options:
  --families=LIST       model types to measure, or none [default: qwen3,gemma3_text,gemma2,granite,olmo2,smollm3]
  --contexts=LIST       long-context points on --long-model, in tokens, or none [default: 64,2048,8192,16384]
  --repeats=N           worker processes per family and backend, alternated; the best is reported [default: 3]
  --long-repeats=N      replies per long-context worker (one worker per point and backend: the prefill is the
                        slow part; replies after the first reuse the prefilled prompt); the best [default: 4]
  --prompt=N            prompt tokens for the families [default: 64]
  --new-tokens=N        tokens generated per family reply, EOS ignored [default: 128]
  --steps=N             tokens generated per long-context reply [default: 64]
  --no-int8             skip the families' int8 artifacts (bfloat16 with --quantize int8)
  --long-backends=LIST  backends at the long-context points [default: torchscript,transformers]
  --tiny                tiny shapes for every family (for tests): only the code paths are real
  --tokenizer=DIR       the tokenizer the random models get [default: models/smollm2-135m-instruct]
  --long-model=DIR      the model of the long-context points [default: models/smollm2-135m-instruct]
  --cache=DIR           where the random models and long-context copies are written, once
                        [default: ~/.cache/chat/bench-families]
  --out=DIR             where bench-families.md and bench-families.json go [default: bench-families]
  --worker=WHAT         internal: one long-context measurement (long-torchscript or long-transformers)

Families: a random-weight model per model type, with the shapes of a real small checkpoint (written below,
SHAPES), or shrunk to about 300M parameters where the checkpoint is too large for a shared 2-core machine
(noted in the table). Each is saved once under --cache, exported to bfloat16 on chat's native kernels (and
bfloat16 with int8 weights), and measured by tools/bench.py's workers: each run in its own process, through
chat.generation.ReplyStream, greedy, with min_new_tokens = max_new_tokens, TorchScript and transformers
(bfloat16) alternated. The bar: TorchScript decodes at least 2x as fast as transformers in bfloat16.

Long context: --long-model in bfloat16 at each point N: a prompt of N - steps tokens (at least 1) is prefilled
(its time reported apart), then `steps` tokens are generated, so prompt and reply fill N positions; decode
tok/s is over the reply's decode steps. The points run on a copy of the model directory under --cache (its
files symlinked, so that the artifact goes there); past the model's max_position_embeddings the copy's
config.json raises it to N: that point measures speed only, beyond the context the model was trained for.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

from docopt import docopt  # noqa: E402

# tools/bench.py: its workers, machine info and export check (by name: a bench/ output folder would make an
# import statement sort differently from one checkout to another)
bench = importlib.import_module("bench")

SLIDING, FULL = "sliding_attention", "full_attention"
FAMILY_MAX_LEN = 1024  # what the families' artifacts hold: prompt and reply fit many times over
BAR = 2.0  # TorchScript's decode against transformers', both bfloat16


def gemma3_layers(n: int) -> list[str]:
    return [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]  # 5 sliding : 1 full


# Per model type: (what it is, the config, by hand). Real sizes where the checkpoint fits; else shrunk.
SHAPES: dict[str, tuple[str, dict]] = {
    "qwen3": (
        "Qwen3-0.6B shapes",
        {
            "hidden_size": 1024,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": 3072,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6,
        },
    ),
    "gemma3_text": (
        "gemma-3-270m shapes",
        {
            "hidden_size": 640,
            "num_hidden_layers": 18,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "intermediate_size": 2048,
            "vocab_size": 262144,
            "sliding_window": 512,
            "layer_types": gemma3_layers(18),
            "query_pre_attn_scalar": 256,
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                FULL: {"rope_type": "default", "rope_theta": 1e6},
            },
            "max_position_embeddings": 32768,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6,
        },
    ),
    "gemma2": (
        "gemma-2-2b shrunk to ~390M (2.6B does not fit this machine's runs)",
        {
            "hidden_size": 1024,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "intermediate_size": 4096,
            "vocab_size": 256000,
            "query_pre_attn_scalar": 128,
            "sliding_window": 4096,
            "layer_types": [SLIDING if i % 2 == 0 else FULL for i in range(8)],
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6,
        },
    ),
    "granite": (
        "granite-3.1-2b shrunk to ~240M",
        {
            "hidden_size": 1024,
            "num_hidden_layers": 12,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "intermediate_size": 4096,
            "vocab_size": 49155,
            "embedding_multiplier": 12.0,
            "attention_multiplier": 0.0078125,
            "residual_multiplier": 0.22,
            "logits_scaling": 8.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6},
            "max_position_embeddings": 131072,
            "tie_word_embeddings": True,
        },
    ),
    "olmo2": (
        "OLMo-2-0425-1B shrunk to ~340M",
        {
            "hidden_size": 1024,
            "num_hidden_layers": 8,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "intermediate_size": 4096,
            "vocab_size": 100352,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
            "rms_norm_eps": 1e-6,
        },
    ),
    "smollm3": (
        "SmolLM3-3B shrunk to ~310M",
        {
            "hidden_size": 1024,
            "num_hidden_layers": 16,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "intermediate_size": 2816,
            "vocab_size": 128256,
            "no_rope_layers": [0 if (i + 1) % 4 == 0 else 1 for i in range(16)],  # 0: no RoPE, every 4th
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6},
            "max_position_embeddings": 65536,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6,
        },
    ),
}
TINY = {  # --tiny: on top of each family's own keys (the vocabulary is the tokenizer's)
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
}
TINY_EXTRA = {
    "gemma3_text": {"sliding_window": 16, "layer_types": [SLIDING, FULL], "query_pre_attn_scalar": 16},
    "gemma2": {"sliding_window": 16, "layer_types": [SLIDING, FULL], "query_pre_attn_scalar": 16},
    "smollm3": {"no_rope_layers": [1, 0]},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def main() -> int:
    args = docopt(__doc__)
    if args["--worker"]:
        kind = args["--worker"].removeprefix("long-")
        result = measure_long(
            kind, args["--model"], args["--device"], args["--dtypes"], int(args["--prompts"]),
            int(args["--new-tokens"]), int(args["--repeats"]),
        )  # fmt: skip
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    listed = lambda value: [] if value.strip() in ("", "none") else [v.strip() for v in value.split(",")]  # noqa: E731
    families, contexts = listed(args["--families"]), [int(n) for n in listed(args["--contexts"])]
    unknown = [f for f in families if f not in SHAPES]
    if unknown:
        raise SystemExit(f"bench_families: unknown family {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    settings = {
        "families": families,
        "contexts": contexts,
        "repeats": int(args["--repeats"]),
        "long_repeats": int(args["--long-repeats"]),
        "prompt": int(args["--prompt"]),
        "new_tokens": int(args["--new-tokens"]),
        "steps": int(args["--steps"]),
        "int8": not args["--no-int8"],
        "long_backends": listed(args["--long-backends"]),
        "tiny": bool(args["--tiny"]),
        "tokenizer": str(Path(args["--tokenizer"]).resolve()),
        "long_model": str(Path(args["--long-model"]).resolve()),
        "cache": str(Path(args["--cache"]).expanduser().resolve()),
    }
    return run_all(settings, Path(args["--out"]))


def run_all(settings: dict, out: Path) -> int:
    started = time.monotonic()
    results: dict = {
        "machine": {**bench.machine("cpu"), **cpu_flags(), "load_before": os.getloadavg()},
        "settings": settings,
        "families": [],
        "long_context": [],
    }
    cache = Path(settings["cache"])
    for family in settings["families"]:
        results["families"].append(bench_family(family, settings, cache))
    for context in settings["contexts"]:
        results["long_context"].append(bench_context(context, settings, cache))
    results["machine"]["load_after"] = os.getloadavg()
    results["minutes"] = (time.monotonic() - started) / 60
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-families.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = render(results)
    (out / "bench-families.md").write_text(markdown)
    print(markdown)
    return 0


# --- models -------------------------------------------------------------------------------------------------


def tokenizer_vocab(tokenizer: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def family_config(family: str, settings: dict) -> tuple[str, dict]:
    what, shape = SHAPES[family]
    vocab = tokenizer_vocab(Path(settings["tokenizer"]))
    if settings["tiny"]:
        keep = {k: v for k, v in shape.items() if k not in ("layer_types", "no_rope_layers", "sliding_window")}
        keep = {k: v for k, v in keep.items() if k not in TINY and k != "vocab_size"}
        shape = {**keep, **TINY, **TINY_EXTRA.get(family, {}), "vocab_size": vocab}
        what = "tiny " + what.split(" ")[0]
    elif vocab > shape["vocab_size"]:
        raise SystemExit(f"bench_families: the tokenizer's {vocab} ids do not fit {family}'s vocabulary")
    return what, shape


def special_ids(tokenizer: Path) -> dict:
    """bos/eos/pad ids as the tokenizer's model directory has them (all < the random model's vocabulary)."""
    try:
        config = json.loads((tokenizer / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return {k: config.get(k, 0) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def build_model(family: str, shape: dict, settings: dict, cache: Path) -> Path:
    """The random model of `family` with `shape`, saved under `cache` once (reused while shape and tokenizer
    stay the same)."""
    key = json.dumps({"family": family, "shape": shape, "tokenizer": settings["tokenizer"]}, sort_keys=True)
    directory = cache / f"{family}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (directory / ".complete").is_file():
        return directory
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    say(f"building a random {family} model in {directory}")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    tokenizer = Path(settings["tokenizer"])
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, directory / name)
    ids = special_ids(tokenizer)
    config = AutoConfig.for_model(family, **shape, **ids)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    GenerationConfig(**ids).save_pretrained(directory)
    del model
    gc.collect()
    (directory / "bench-families.json").write_text(key + "\n")
    (directory / ".complete").write_text("")
    return directory


def parameters(model: Path) -> int:
    """Parameters in the model's safetensors files (a tied embedding once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                count = 1
                for n in f.get_slice(name).get_shape():
                    count *= n
                total += count
    return total


def long_model(context: int, settings: dict, cache: Path) -> tuple[Path, bool]:
    """The model directory for a point of `context` tokens, and whether that runs past its trained context.

    A copy of --long-model under `cache` (its files symlinked), so that its artifact is written there and not
    into the model's own torchscript/ folder (which `make demo-artifact` and others own); past the model's
    max_position_embeddings, a copy whose config.json raises that to `context`."""
    model = Path(settings["long_model"])
    config = json.loads((model / "config.json").read_text())
    trained = int(config.get("max_position_embeddings") or 0)
    past = context > trained
    copy = cache / f"{model.name}-{hashlib.sha256(str(model).encode()).hexdigest()[:6]}"
    copy = copy.with_name(f"{copy.name}-ctx{context}") if past else copy
    if not (copy / "config.json").is_file():
        extended = f" with max_position_embeddings {context} (trained for {trained})" if past else ""
        say(f"{copy}: a copy of {model.name}{extended}")
        copy.mkdir(parents=True, exist_ok=True)
        for item in model.iterdir():
            if item.is_file() and item.name != "config.json" and not (copy / item.name).exists():
                (copy / item.name).symlink_to(item.resolve())
        text = json.dumps({**config, "max_position_embeddings": max(context, trained)}, indent=2) + "\n"
        (copy / "config.json").write_text(text)
    return copy, past


# --- exports ------------------------------------------------------------------------------------------------


def ensure_artifact(model: Path, dtype: str, max_len: int | None) -> str | None:
    """Export MODEL/torchscript/cpu-DTYPE (DTYPE bfloat16-int8: bfloat16 with int8 weights) unless a current one
    holding max_len positions is there; each export in its own process. None, or why the export failed."""
    from chat.artifact import artifact_dir_for, is_artifact, read_manifest

    artifact = artifact_dir_for(model, "cpu", dtype)
    current = is_artifact(artifact) and not bench.older_than_exporter(artifact)
    if current and (max_len is None or int(read_manifest(artifact)["max_len"]) >= max_len):
        return None
    plain, _, quantize = dtype.partition("-")
    argv = [sys.executable, "-m", "chat.export", str(model), str(artifact), f"--dtype={plain}"]
    argv += [f"--max-len={max_len}"] if max_len else []
    argv += [f"--quantize={quantize}"] if quantize else []
    say(f"exporting {artifact}")
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    why = next((line for line in reversed(lines) if "expected at most" in line), lines[-1] if lines else "")
    sys.stderr.write(done.stderr[-3000:])
    if "expected at most" in why:
        why += " (the native library predates chat::cache_attend's new signature: run python -m chat.native --force)"
    return f"export {dtype} failed: {why[:300]}"


# --- measurements -------------------------------------------------------------------------------------------


def measure(common: dict, what: str, dtype: str, script: str | Path = bench.__file__) -> dict:
    """One worker of tools/bench.py (or of this script), its failure a dict with the reason."""
    load = os.getloadavg()[0]
    try:
        result = bench.worker(common, what, dtype, script)
    except SystemExit as why:
        return {"error": str(why), "load": load}
    return {**result, "load": load}


def best_decode(runs: list[dict], key: str) -> float | None:
    speeds = [run["prompts"][key]["decode_tok_s"] for run in runs if "error" not in run]
    return max(speeds) if speeds else None


def bench_family(family: str, settings: dict, cache: Path) -> dict:
    what, shape = family_config(family, settings)
    model = build_model(family, shape, settings, cache)
    row: dict = {"family": family, "what": what, "model": str(model), "parameters": parameters(model), "errors": []}
    say(f"{family}: {what}, {row['parameters'] / 1e6:.0f}M parameters")
    dtypes = ["bfloat16"] + (["bfloat16-int8"] if settings["int8"] else [])
    for dtype in list(dtypes):
        if why := ensure_artifact(model, dtype, FAMILY_MAX_LEN):
            row["errors"].append(why)
            dtypes.remove(dtype)
    common = {
        "model": str(model),
        "device": "cpu",
        "prompts": str(settings["prompt"]),
        "new_tokens": settings["new_tokens"],
        "repeats": 1,
    }
    kinds = [("torchscript", d) for d in dtypes] + [("transformers", "bfloat16")]
    runs: dict[str, list[dict]] = {f"{k} {d}": [] for k, d in kinds}
    for r in range(settings["repeats"]):
        for kind, dtype in kinds if r % 2 == 0 else kinds[::-1]:  # alternated, and the order flipped each round
            runs[f"{kind} {dtype}"].append(measure({**common, "dtypes": dtype}, kind, dtype))
    key = str(settings["prompt"])
    row["runs"] = runs
    row["decode_tok_s"] = {name: best_decode(r, key) for name, r in runs.items()}
    row["runs_on"] = {name: next((x["runs_on"] for x in r if "runs_on" in x), "") for name, r in runs.items()}
    row["peak_rss_mib"] = {name: max((x["peak_rss_mib"] for x in r if "error" not in x), default=None) for name, r in runs.items()}  # noqa: E501  # fmt: skip
    row["errors"] += sorted({x["error"] for r in runs.values() for x in r if "error" in x})
    return row


def bench_context(context: int, settings: dict, cache: Path) -> dict:
    model, past = long_model(context, settings, cache)
    steps = min(settings["steps"], context - 1)
    row: dict = {"context": context, "model": str(model), "past_trained_context": past, "errors": []}
    if why := ensure_artifact(model, "bfloat16", None):  # the model's own context: it holds `context`
        row["errors"].append(why)
    common = {
        "model": str(model),
        "device": "cpu",
        "prompts": str(context - steps),
        "new_tokens": steps,
        "repeats": settings["long_repeats"],
    }
    for kind in settings["long_backends"]:
        if kind == "torchscript" and row["errors"]:
            continue
        say(f"context {context}: {kind}, prompt {context - steps} tokens, {steps} new")
        row[kind] = measure({**common, "dtypes": "bfloat16"}, f"long-{kind}", "bfloat16", __file__)
        if "error" in row[kind]:
            row["errors"].append(f"{kind}: {row[kind]['error']}")
    return row


def measure_long(kind: str, model: str, device: str, dtype: str, prompt: int, steps: int, replies: int) -> dict:
    """Prefill `prompt` tokens (timed, not counted in decode), then generate `steps` tokens, `replies` times
    with the same prompt (the cached prompt is reused: one token is recomputed); the best decode."""
    import torch

    from chat.generation import ReplyStream
    from chat.params import GenerationParams

    backend, load_s = bench.load_backend(kind, model, device, dtype)
    ids = long_ids(backend.tokenizer, prompt)
    params = GenerationParams(max_new_tokens=steps, min_new_tokens=steps, temperature=0.0, top_k=0, top_p=1.0)
    runs = []
    for _ in range(max(1, replies)):
        stream = ReplyStream(backend, ids, params, torch.Generator())
        for _ in stream:
            pass
        runs.append({"ttft_ms": stream.stats.ttft_ms, "decode_tok_s": stream.stats.decode_tok_s})
    return {
        "load_s": load_s,
        "backend": backend.info.name,
        "runs_on": backend.info.runs_on,
        "prompt_tokens": len(ids),
        "new_tokens": steps,
        "prefill_s": runs[0]["ttft_ms"] / 1000,
        "decode_tok_s": max(run["decode_tok_s"] for run in runs),
        "all": runs,
        "peak_rss_mib": bench.peak_rss_mib(),
    }


def long_ids(tokenizer, length: int) -> list[int]:
    """`length` token ids of bench.TEXT repeated (one text for every point, cut to length)."""
    repeats = 40
    while len(ids := tokenizer.encode(bench.TEXT * repeats, add_special_tokens=False)) < length:
        repeats *= 2
    return ids[:length]


# --- output -------------------------------------------------------------------------------------------------


def cpu_flags() -> dict:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"flags": []}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    return {"flags": [f for f in wanted if f in flags]}


def millions(count: int) -> str:
    return f"{count / 1e6:.0f}M" if count >= 1e7 else f"{count / 1e6:.2f}M"


def speed(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def render(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    load = lambda avg: " / ".join(f"{x:.2f}" for x in avg)  # noqa: E731
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['flags']) or 'none of avx2/avx512/amx'}; "
        f"torch {m['torch']}, transformers {m.get('transformers', '-')}, python {m['python']}, {m['date']}. "
        f"Load average (1/5/15 min) before {load(m['load_before'])}, after {load(m['load_after'])}; "
        f"{results['minutes']:.0f} min in all.",
        "",
    ]
    if results["families"]:
        lines += [
            f"Decode tok/s, random weights, bfloat16; prompt {s['prompt']} tokens, {s['new_tokens']} new (EOS "
            f"ignored), greedy; best of {s['repeats']} worker processes per backend, alternated. Bar: TorchScript "
            f">= {BAR:g}x transformers.",
            "",
            "| family | shapes | params | transformers | torchscript | vs transformers | meets 2x | int8 "
            "torchscript | int8 vs transformers |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in results["families"]:
            tok = row.get("decode_tok_s", {})
            hf, ts = tok.get("transformers bfloat16"), tok.get("torchscript bfloat16")
            q = tok.get("torchscript bfloat16-int8")
            meets = "-" if not hf or not ts else ("yes" if ts >= BAR * hf else "no")
            lines.append(
                f"| {row['family']} | {row['what']} | {millions(row['parameters'])} | {speed(hf)} | {speed(ts)} | "
                f"{ratio(ts, hf)} | {meets} | {speed(q)} | {ratio(q, hf)} |"
            )
        ran = [row.get("runs_on", {}) for row in results["families"]]
        kernels = sorted({v for on in ran for k, v in on.items() if k.startswith("torchscript")})
        lines += ["", f"TorchScript ran on: {'; '.join(kernels) or '-'}."]
        lines += [f"- {row['family']}: {e}" for row in results["families"] for e in row["errors"]]
        lines.append("")
    if results["long_context"]:
        steps = s["steps"]
        lines += [
            f"Long context, {Path(s['long_model']).name}, bfloat16: a prompt of N - {steps} tokens prefilled "
            f"(first-token time below), then {steps} new tokens, so the reply ends at N positions; decode tok/s "
            f"best of {s['long_repeats']} replies in one worker per backend (replies after the first reuse the "
            "cached prompt).",
            "",
            "| context N | torchscript | transformers | vs transformers | prefill s torchscript | prefill s "
            "transformers | note |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in results["long_context"]:
            ts, hf = row.get("torchscript", {}), row.get("transformers", {})
            tsd, hfd = ts.get("decode_tok_s"), hf.get("decode_tok_s")
            note = "past the trained context (speed only)" if row["past_trained_context"] else ""
            prefill = lambda r: "-" if "prefill_s" not in r else f"{r['prefill_s']:.1f}"  # noqa: E731
            lines.append(
                f"| {row['context']} | {speed(tsd)} | {speed(hfd)} | {ratio(tsd, hfd)} | {prefill(ts)} | "
                f"{prefill(hf)} | {note} |"
            )
        lines += [f"- context {row['context']}: {e}" for row in results["long_context"] for e in row["errors"]]
    return "\n".join(lines).rstrip() + "\n"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
