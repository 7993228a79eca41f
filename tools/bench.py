#!/usr/bin/env python3
"""Benchmark the TorchScript and transformers backends side by side on one model.

Usage:
  bench.py [--model=DIR] [--device=DEVICE] [--dtypes=LIST] [--prompts=LIST] [--new-tokens=N]
           [--repeats=N] [--out=DIR]
  bench.py --worker=WHAT --model=DIR --device=DEVICE --dtypes=LIST --prompts=LIST --new-tokens=N --repeats=N
  bench.py (-h | --help)

Options:
  --model=DIR      a model directory [default: models/smollm2-135m-instruct]
  --device=DEVICE  cpu or cuda; auto takes cuda when there is one [default: auto]
  --dtypes=LIST    comma-separated dtypes; default: bfloat16,float32 on CPU, bfloat16 on CUDA. DTYPE-int8
                   (float32-int8, say) or bfloat16-int4 measures an artifact exported with --quantize int8
                   (or int4) against transformers in DTYPE
  --prompts=LIST   prompt lengths in tokens [default: 64,512]
  --new-tokens=N   tokens generated per reply, EOS ignored [default: 256]
  --repeats=N      runs per prompt and backend; the best is reported (the machine may be shared) [default: 3]
  --out=DIR        where bench.json and bench.md go [default: bench]
  --worker=WHAT    internal: run one measurement (torchscript, transformers or floor) in this process

Every measurement runs in its own process, so each backend's peak memory is its own. Both backends are
driven through the same chat.generation.ReplyStream, greedy, with min_new_tokens = max_new_tokens so that
EOS does not end a reply early. The TorchScript artifact is MODEL/torchscript/DEVICE-DTYPE, exported first
(without --verify) if it is not there or is older than the exporter's code (MODEL/torchscript/cpu-DTYPE-int8
for the int8 ones, -int4 for int4). On CPU the floor is the time of the weight matmuls of one token (F.linear,
M=1, the checkpoint's own weight shapes), measured in the same run and as decode is: the mean over the reply's
tokens, best of the runs.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from docopt import docopt  # noqa: E402

TEXT = (
    "The history of computing is a story of machines that grew smaller and faster while the problems they "
    "solved grew larger. Early computers filled rooms; today a phone holds more memory than all of them. "
)


def main() -> int:
    args = docopt(__doc__)
    device = args["--device"]
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = args["--dtypes"] or ("bfloat16,float32" if device == "cpu" else "bfloat16")
    common = {
        "model": str(Path(args["--model"]).resolve()),
        "device": device,
        "dtypes": dtypes,
        "prompts": args["--prompts"],
        "new_tokens": int(args["--new-tokens"]),
        "repeats": int(args["--repeats"]),
    }
    if args["--worker"]:
        result = WORKERS[args["--worker"]](**common)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    return run_all(common, Path(args["--out"]))


def run_all(common: dict, out: Path) -> int:
    from chat.artifact import artifact_dir_for, is_artifact

    model = Path(common["model"])
    rows, results = [], {"machine": machine(common["device"]), "settings": common, "runs": []}
    for dtype in common["dtypes"].split(","):
        artifact = artifact_dir_for(model, common["device"], dtype)
        if not is_artifact(artifact) or older_than_exporter(artifact):
            print(f"exporting {artifact} first", file=sys.stderr, flush=True)
            from chat.export import export, stderr_progress

            plain, _, quantize = dtype.partition("-")
            export(
                str(model),
                artifact,
                device=common["device"],
                dtype=plain,
                quantize=quantize or None,
                progress=stderr_progress(),
            )
        run = {"dtype": dtype}
        # The floor before and after the backends; the better of the two (the machine may be shared).
        floors = []
        if common["device"] == "cpu":
            floors.append(worker(common, "floor", dtype))
        run["transformers"] = worker(common, "transformers", dtype)
        run["torchscript"] = worker(common, "torchscript", dtype)
        if floors:
            floors.append(worker(common, "floor", dtype))
            run["floor_tok_s"] = max(f["tok_s"] for f in floors)
        results["runs"].append(run)
        rows.extend(table_rows(run))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = render(results, rows)
    (out / "bench.md").write_text(markdown)
    print(markdown)
    return 0


def peak_rss_mib() -> float:
    """This process's peak resident memory. On Linux from VmHWM: ru_maxrss carries over the parent's size at
    fork through exec, so a worker started after an export in the parent would report the export's memory."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def older_than_exporter(artifact: Path) -> bool:
    """Whether the exporter's code or the native kernels changed since `artifact` was written: the table must
    measure the code as it is (as `make demo-artifact` re-exports the demo's artifact)."""
    from chat.artifact import MANIFEST

    written = (artifact / MANIFEST).stat().st_mtime
    native = REPO / "chat" / "native"
    sources = [*(REPO / "chat" / "export").glob("*.py"), *(REPO / "chat" / "lean").glob("*.py")]
    sources += [*native.glob("*.cpp"), *native.glob("*.h")]
    return any(source.stat().st_mtime > written for source in sources)


def worker(common: dict, what: str, dtype: str, script: str | Path = __file__) -> dict:
    """Run one measurement in a fresh process: `script --worker=WHAT` with `common` as its options (dtypes: the
    one dtype), and return the dict it prints on its RESULT line. tools/bench_families.py runs its own script."""
    print(f"measuring {what} {dtype} ...", file=sys.stderr, flush=True)
    argv = [sys.executable, str(script), f"--worker={what}"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in {**common, "dtypes": dtype}.items()]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"bench: the {what} {dtype} measurement failed (exit {done.returncode})")
    return json.loads(lines[-1].removeprefix("RESULT "))


def load_backend(kind: str, model: str, device: str, dtypes: str):
    """(backend, seconds it took to load): the artifact MODEL/torchscript/DEVICE-DTYPES, or transformers."""
    from chat.backends.base import LoadOptions

    options = LoadOptions(model=model, device=device, dtype=dtypes.partition("-")[0])  # "float32-int8": float32
    started = time.perf_counter()
    if kind == "torchscript":
        from chat.artifact import artifact_dir_for
        from chat.backends.torchscript_backend import TorchScriptBackend

        backend = TorchScriptBackend(artifact_dir_for(Path(model), device, dtypes), options)
    else:
        from chat.backends.transformers_backend import TransformersBackend

        backend = TransformersBackend(options)
    sync(device)
    return backend, time.perf_counter() - started


def measure_backend(kind: str, model: str, device: str, dtypes: str, prompts: str, new_tokens: int, repeats: int):
    import torch

    from chat.generation import ReplyStream
    from chat.params import GenerationParams

    backend, load_s = load_backend(kind, model, device, dtypes)
    text_ids = backend.tokenizer.encode(TEXT * 40, add_special_tokens=False)
    params = GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0, top_k=0, top_p=1.0)

    def reply(prompt: list[int], tokens: int = new_tokens) -> dict:
        stream = ReplyStream(
            backend, prompt, params.replace(max_new_tokens=tokens, min_new_tokens=tokens), torch.Generator()
        )
        for _ in stream:
            pass
        sync(device)
        return {"ttft_ms": stream.stats.ttft_ms, "decode_tok_s": stream.stats.decode_tok_s, "text": stream.text}

    reply(text_ids[:16], 8)  # warm-up
    result: dict = {
        "load_s": load_s,
        "backend": backend.info.name,
        "device": backend.info.device,
        "runs_on": backend.info.runs_on,
        "prompts": {},
    }
    for length in (int(n) for n in prompts.split(",")):
        runs = []
        for r in range(repeats):
            # A different first token each time, so that neither backend reuses a cached prefix.
            runs.append(reply([text_ids[r + 1], *text_ids[1:length]]))
        result["prompts"][str(length)] = {
            "ttft_ms": min(run["ttft_ms"] for run in runs),
            "decode_tok_s": max(run["decode_tok_s"] for run in runs),
            "all": [{k: v for k, v in run.items() if k != "text"} for run in runs],
            "text_start": runs[0]["text"][:80],
        }
    if device == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    result["peak_rss_mib"] = peak_rss_mib()
    return result


EMBEDDINGS = ("embed", "wte", "wpe")  # looked up, not multiplied


def measure_floor(model: str, device: str, dtypes: str, new_tokens: int, repeats: int, **_) -> dict:
    """Tokens per second if a token cost only its weight matmuls (M=1, the checkpoint's own weight shapes).

    Measured as decode is: the mean over new_tokens - 1 tokens, best of `repeats` runs. (The best single
    pass would catch a quiet moment of a shared machine that a 256-token reply does not.)"""
    import torch
    import torch.nn.functional as F
    from safetensors import safe_open

    from chat.backends.base import cpu_threads

    torch.set_num_threads(cpu_threads())
    dtype = getattr(torch, dtypes.partition("-")[0])
    shapes = []
    for path in sorted(Path(model).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shape = f.get_slice(name).get_shape()
                if name.endswith(".weight") and len(shape) == 2 and not any(e in name for e in EMBEDDINGS):
                    shapes.append(shape)
    config = json.loads((Path(model) / "config.json").read_text())
    if not any(s[0] == config.get("vocab_size") for s in shapes):  # tied output head: the embedding's shape
        shapes.append([config["vocab_size"], config.get("hidden_size") or config.get("n_embd")])
    weights = [torch.randn(*s).to(dtype) for s in shapes]
    x = {s[1]: torch.randn(1, s[1]).to(dtype) for s in shapes}
    tokens = max(1, new_tokens - 1)
    with torch.inference_mode():
        for w in weights:
            F.linear(x[w.shape[1]], w)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(tokens):
                for w in weights:
                    F.linear(x[w.shape[1]], w)
            best = min(best, (time.perf_counter() - started) / tokens)
    return {"tok_s": 1 / best, "matmuls": len(shapes), "weight_mib": sum(w.nbytes for w in weights) / 2**20}


WORKERS = {
    "torchscript": lambda **kw: measure_backend("torchscript", **kw),
    "transformers": lambda **kw: measure_backend("transformers", **kw),
    "floor": measure_floor,
}


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def machine(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table_rows(run: dict) -> list[str]:
    rows = []
    ts, hf = run["torchscript"], run["transformers"]
    for length in ts["prompts"]:
        t, h = ts["prompts"][length], hf["prompts"][length]
        floor = run.get("floor_tok_s")
        memory = "peak_gpu_mib" if "peak_gpu_mib" in ts else "peak_rss_mib"
        for name, r, m in (("torchscript", t, ts), ("transformers", h, hf)):
            pct = f"{100 * r['decode_tok_s'] / floor:.0f}%" if floor else "-"
            speedup = f"{r['decode_tok_s'] / h['decode_tok_s']:.2f}x"
            rows.append(
                f"| {run['dtype']} | {length} | {name} | {m['load_s']:.1f} | {r['ttft_ms']:.0f} | "
                f"{r['decode_tok_s']:.1f} | {speedup} | {pct} | {m[memory]:.0f} |"
            )
    return rows


def render(results: dict, rows: list[str]) -> str:
    m, s = results["machine"], results["settings"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores"
    floors = ", ".join(f"{r['dtype']} {r['floor_tok_s']:.1f} tok/s" for r in results["runs"] if "floor_tok_s" in r)
    memory = "peak GPU MiB" if s["device"] == "cuda" else "peak RSS MiB"
    lines = [
        f"Model {Path(s['model']).name}, {s['device']} ({where}), torch {m['torch']}, {m['date']}; greedy, "
        f"{s['new_tokens']} new tokens (EOS ignored), best of {s['repeats']} runs.",
        "",
        f"| dtype | prompt | backend | load s | first token ms | decode tok/s | vs transformers | % of floor "
        f"| {memory} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    if floors:
        lines += ["", f"Matmul floor (weight matmuls of one token, M=1): {floors}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
