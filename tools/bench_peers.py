#!/usr/bin/env python3
"""Our TorchScript core against llama.cpp on one model on the CPU: decode, prefill and peak memory.

Usage:
  bench_peers.py [--model=DIR] [--threads=N] [--rounds=N] [--minutes=M] [--new-tokens=N] [--out=DIR]
  bench_peers.py (-h | --help)

Options:
  --model=DIR     a model directory [default: models/smollm2-135m-instruct]
  --threads=N     threads for both sides (but the one-thread pair); default: every CPU this process may use
  --rounds=N      alternated rounds, at least [default: 3]
  --minutes=M     after those, more rounds while one more still fits in M minutes since the start [default: 0]
  --new-tokens=N  tokens decoded per measurement [default: 256]
  --out=DIR       where peers.json and peers.md go [default: bench]

The pairs: our bfloat16 artifact against llama.cpp's BF16 file, our bfloat16-int8 one against Q8_0,
bfloat16-int4 against Q4_0, float32 against F32, and bfloat16 against BF16 on one thread. llama.cpp is built
once by tools/llama_cpp.py (minutes; then reused), which also converts the model (convert_hf_to_gguf.py; Q8_0
and Q4_0 by llama-quantize); our artifacts are exported first where missing or older than the exporter, as
tools/bench.py does.

A round measures each pair once, each side in its own processes, the side that goes first alternating:
ours is tools/bench.py's torchscript worker (greedy, a 64- and a 512-token prompt, NEW_TOKENS tokens with EOS
ignored; threads fixed by OMP_NUM_THREADS), llama.cpp's is `llama-bench -t N -p 0 -n NEW_TOKENS -d 64,512` and
`llama-bench -t N -p 512 -n 0`, one repetition each. Depth (-d) is the context before decode, the part our
prompt plays; prefill 512 is our time to first token at the 512-token prompt, as tokens per second. Peak RSS:
our worker's own VmHWM; llama-bench's from /usr/bin/time (else psutil, polled), the larger of its two runs.
llama-bench's context is only as long as its test, so each file is also run once as a chat would run it:
llama-server with a context of 4096 tokens (whose KV cache it reserves whole at start), its VmHWM read after
one greedy reply to the question below.
A shared machine moves single runs by a lot, so the tables give the best of the rounds and, in brackets, the
median; a ratio's median is over the rounds' own ratios (each side measured minutes apart at most). Also
printed: the load average through the run, the CPU's flags, and what llama-simple answers greedily to "What is
the capital of France?" with the BF16, Q8_0 and Q4_0 files.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from docopt import docopt

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path[:0] = [str(REPO), str(TOOLS)]

# By name, not `import`: ruff would sort `bench` as first-party or not as a bench/ output folder exists.
bench = importlib.import_module("bench")  # tools/bench.py: its worker measures our side
llama_cpp = importlib.import_module("llama_cpp")

DEPTHS = (64, 512)
PREFILL = 512
# (our artifact's dtype, llama.cpp's file type, threads: None for --threads)
PAIRS: list[tuple[str, str, int | None]] = [
    ("bfloat16", "BF16", None),
    ("bfloat16-int8", "Q8_0", None),
    ("bfloat16-int4", "Q4_0", None),
    ("float32", "F32", None),
    ("bfloat16", "BF16", 1),
]
METRICS = ("decode_64", "decode_512", "prefill_512", "peak_rss_mib")
CHAT_CONTEXT = 4096  # llama-server's -c for the chat measurement
SERVER_START_LIMIT_S = 600  # a guard against a llama-server that hangs while starting, not a timing
QUESTION = "What is the capital of France?"
ANSWERED_BY = ("BF16", "Q8_0", "Q4_0")
# What decides a CPU's kernels on either side; lscpu spells them as /proc/cpuinfo does.
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def main() -> int:
    args = docopt(__doc__)
    model = Path(args["--model"]).resolve()
    threads = int(args["--threads"] or len(os.sched_getaffinity(0)))
    new_tokens = int(args["--new-tokens"])
    started = time.monotonic()
    loads = [os.getloadavg()]
    programs = llama_cpp.ensure_built()
    ggufs = {kind: llama_cpp.gguf(model, kind) for kind in sorted({k for _, k, _ in PAIRS} | set(ANSWERED_BY))}
    for dtype in sorted({d for d, _, _ in PAIRS}):
        ensure_artifact(model, dtype)
    answers = {kind: answer(programs["llama-simple"], ggufs[kind], model) for kind in ANSWERED_BY}
    for kind, text in answers.items():
        print(f"llama.cpp {kind} answers: {text!r}", file=sys.stderr, flush=True)
    as_chat = [as_chat_rss(programs["llama-server"], ggufs[kind], n or threads) for _, kind, n in PAIRS]

    rounds: list[list[dict]] = []
    durations: list[float] = []
    while True:
        begun = time.monotonic()
        loads.append(os.getloadavg())
        print(f"round {len(rounds) + 1}, load average {loads[-1][0]:.2f}", file=sys.stderr, flush=True)
        results = []
        for i, (dtype, kind, n) in enumerate(PAIRS):
            n = n or threads
            sides = {
                "ours": lambda dtype=dtype, n=n: ours(model, dtype, n, new_tokens),
                "llama": lambda kind=kind, n=n: theirs(programs["llama-bench"], ggufs[kind], n, new_tokens),
            }
            order = ["ours", "llama"] if (len(rounds) + i) % 2 == 0 else ["llama", "ours"]
            results.append({side: sides[side]() for side in order})
        rounds.append(results)
        durations.append(time.monotonic() - begun)
        elapsed = time.monotonic() - started
        if len(rounds) >= int(args["--rounds"]) and elapsed + max(durations) > float(args["--minutes"]) * 60:
            break
    loads.append(os.getloadavg())

    report = {
        "machine": {**bench.machine("cpu"), "flags": cpu_flags(), "llama_cpp": llama_cpp.VERSION},
        "settings": {"model": str(model), "threads": threads, "new_tokens": new_tokens, "rounds": len(rounds)},
        "load_average": loads,
        "minutes": (time.monotonic() - started) / 60,
        "answers": answers,
        "pairs": [
            {"ours": d, "llama": k, "threads": n or threads, "llama_server_rss_mib": rss}
            for (d, k, n), rss in zip(PAIRS, as_chat, strict=True)
        ],
        "rounds": rounds,
    }
    out = Path(args["--out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render(report)
    (out / "peers.md").write_text(markdown)
    print(markdown)
    return 0


def ensure_artifact(model: Path, dtype: str) -> None:
    """Export MODEL for `dtype` (bfloat16-int8: with --quantize int8) unless a current artifact is there; in
    its own process, so this one stays small."""
    from chat.artifact import artifact_dir_for, is_artifact

    artifact = artifact_dir_for(model, "cpu", dtype)
    if is_artifact(artifact) and not bench.older_than_exporter(artifact):
        return
    print(f"exporting {artifact} first", file=sys.stderr, flush=True)
    plain, _, quantize = dtype.partition("-")
    argv = [sys.executable, "-m", "chat.export", str(model), str(artifact), f"--dtype={plain}"]
    subprocess.run(argv + ([f"--quantize={quantize}"] if quantize else []), check=True, cwd=REPO)


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ours(model: Path, dtype: str, threads: int, new_tokens: int) -> dict:
    common = {
        "model": str(model),
        "device": "cpu",
        "dtypes": dtype,
        "prompts": ",".join(str(d) for d in DEPTHS),
        "new_tokens": new_tokens,
        "repeats": 1,
    }
    # OMP_NUM_THREADS fixes chat's thread count (else it lowers it when it sees busy CPUs), as -t does theirs.
    with environ(OMP_NUM_THREADS=str(threads)):
        result = bench.worker(common, "torchscript", dtype)
    prompts = result["prompts"]
    return {
        **{f"decode_{d}": prompts[str(d)]["decode_tok_s"] for d in DEPTHS},
        "prefill_512": PREFILL / (prompts[str(PREFILL)]["ttft_ms"] / 1000),
        "peak_rss_mib": result["peak_rss_mib"],
    }


def theirs(llama_bench: Path, gguf: Path, threads: int, new_tokens: int) -> dict:
    common = [str(llama_bench), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"]
    depths = ",".join(str(d) for d in DEPTHS)
    print(f"measuring llama.cpp {gguf.stem.rsplit('-', 1)[-1]} -t {threads} ...", file=sys.stderr, flush=True)
    decode, rss_decode = run_measured([*common, "-p", "0", "-n", str(new_tokens), "-d", depths])
    prefill, rss_prefill = run_measured([*common, "-p", str(PREFILL), "-n", "0"])
    result = {f"decode_{t['n_depth']}": t["avg_ts"] for t in decode}
    result["prefill_512"] = prefill[0]["avg_ts"]
    result["peak_rss_mib"] = max(rss_decode, rss_prefill)
    result["build"] = {k: decode[0].get(k) for k in ("build_commit", "cpu_info", "type_k", "n_batch", "n_ubatch")}
    return result


def run_measured(argv: list[str]) -> tuple[list[dict], float]:
    """llama-bench's JSON results and its peak RSS in MiB."""
    if os.access("/usr/bin/time", os.X_OK):
        with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
            done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *argv], capture_output=True, text=True)
            check(done, argv)
            return json.loads(done.stdout), int(rss.read().split()[-1]) / 1024  # %M: KiB
    import psutil

    # No GNU time: poll. (Not ru_maxrss from wait4: at exec it keeps the forking parent's size.)
    process = psutil.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, process.memory_info().rss)
        time.sleep(0.02)
    stdout, stderr = process.communicate()
    check(subprocess.CompletedProcess(argv, process.returncode, stdout, stderr), argv)
    return json.loads(stdout), peak / 2**20


def check(done: subprocess.CompletedProcess, argv: list[str]) -> None:
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"bench_peers: {' '.join(argv)} failed (exit {done.returncode})")


def answer(llama_simple: Path, gguf: Path, model: Path) -> str:
    """llama.cpp's greedy reply (llama-simple) to QUESTION in the model's own chat template, 32 tokens at most."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    messages = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Replace, not fail: 32 tokens can end inside a character, and a model's bytes need not be UTF-8 at all.
    argv = [str(llama_simple), "-m", str(gguf), "-n", "32", prompt]
    done = subprocess.run(argv, capture_output=True, text=True, errors="replace")
    check(done, [str(llama_simple), str(gguf)])
    # It prints the prompt (special tokens as text) before the reply.
    reply = done.stdout.rsplit("<|im_start|>assistant\n", 1)[-1]
    return reply.split("<|im_end|>", 1)[0].strip()


def as_chat_rss(llama_server: Path, gguf: Path, threads: int) -> float:
    """Peak RSS in MiB of llama-server (-c CHAT_CONTEXT, one slot) after one greedy reply to QUESTION."""
    print(f"measuring llama-server {gguf.stem.rsplit('-', 1)[-1]} -c {CHAT_CONTEXT} ...", file=sys.stderr, flush=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [str(llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["-c", str(CHAT_CONTEXT), "-np", "1", "-t", str(threads)]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SERVER_START_LIMIT_S
        try:
            while True:  # up when /health answers 200 (503 while it loads)
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
                    why = "did not answer /health" if process.poll() is None else f"exited with {process.returncode}"
                    raise SystemExit(f"bench_peers: {' '.join(argv)} {why}")
                with contextlib.suppress(OSError):
                    if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                        break
                time.sleep(0.2)
            request = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 32, "temperature": 0}
            post = urllib.request.Request(
                f"{url}/v1/chat/completions", json.dumps(request).encode(), {"Content-Type": "application/json"}
            )
            urllib.request.urlopen(post, timeout=600).read()
            status = Path(f"/proc/{process.pid}/status").read_text()
            return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
        finally:
            process.terminate()
            process.wait()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in FLAGS if f in present]
    except OSError:
        pass
    return []


def summary(report: dict, p: int, side: str, metric: str) -> tuple[float, float]:
    """The best (least memory, most tok/s) and the median of the rounds."""
    values = [r[p][side][metric] for r in report["rounds"]]
    best = min(values) if metric == "peak_rss_mib" else max(values)
    return best, statistics.median(values)


def ratio(report: dict, p: int, metric: str) -> tuple[float, float]:
    """Ours / llama.cpp: of the bests, and the median of the rounds' own ratios."""
    best = summary(report, p, "ours", metric)[0] / summary(report, p, "llama", metric)[0]
    per_round = [r[p]["ours"][metric] / r[p]["llama"][metric] for r in report["rounds"]]
    return best, statistics.median(per_round)


def render(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    loads = [f"{load[0]:.2f}" for load in report["load_average"]]
    names = [f"{q['ours']} / {q['llama']}, {q['threads']} thread{'s' * (q['threads'] > 1)}" for q in report["pairs"]]
    lines = [
        f"Model {Path(s['model']).name}, {m['cpu']}, {m['cores']} cores (flags: {' '.join(m['flags']) or 'none'}), "
        f"torch {m['torch']}, llama.cpp of llama-cpp-python {m['llama_cpp']}, {m['date']}; {s['rounds']} alternated "
        f"rounds in {report['minutes']:.0f} min, {s['new_tokens']} decoded tokens; 1-minute load average "
        f"{', '.join(loads)} (start, each round, end).",
        "",
        "Ours / llama.cpp (above 1: ours faster, or for RSS larger), of the bests (median of the rounds' ratios):",
        "",
        "| pair | decode @64 | decode @512 | prefill 512 | peak RSS |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p, name in enumerate(names):
        cells = [f"{b:.2f} ({med:.2f})" for b, med in (ratio(report, p, metric) for metric in METRICS)]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += [
        "",
        "Tokens per second and MiB, best (median):",
        "",
        "| pair | side | decode @64 | decode @512 | prefill 512 | peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p, name in enumerate(names):
        for side in ("ours", "llama"):
            cells = []
            for metric in METRICS:
                best, median = summary(report, p, side, metric)
                cells.append(f"{best:.0f} ({median:.0f})" if metric == "peak_rss_mib" else f"{best:.1f} ({median:.1f})")
            lines.append(f"| {name} | {'ours' if side == 'ours' else 'llama.cpp'} | {' | '.join(cells)} |")
    lines += [
        "",
        f"Peak RSS as a chat: llama.cpp's llama-server with a {CHAT_CONTEXT}-token context (its KV cache reserved",
        "whole at start), after one reply; ours as above, best of the rounds (its cache grows as a chat needs):",
        "",
        "| pair | ours MiB | llama-server MiB | ours / llama-server |",
        "| --- | --- | --- | --- |",
    ]
    for p, name in enumerate(names):
        ours_rss, server_rss = summary(report, p, "ours", "peak_rss_mib")[0], report["pairs"][p]["llama_server_rss_mib"]
        lines.append(f"| {name} | {ours_rss:.0f} | {server_rss:.0f} | {ours_rss / server_rss:.2f} |")
    lines += ["", f'llama.cpp\'s greedy answers (llama-simple) to "{QUESTION}":', ""]
    lines += [f"- {kind}: {text!r}" for kind, text in report["answers"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
