"""What a user waits for on the first `chat MODEL` and on later ones: export on first use against transformers.

Usage: .venv/bin/python tools/bench_first_use.py [--model=DIR] [--rounds=N]

MODEL (default: the demo model) is linked file by file into a plain directory with no torchscript/ folder,
so auto has to export it. Each round runs, alternated, in a pseudo-terminal as a user would:
  cold         an empty artifact cache: the first run, which exports;
  warm         the cache that run left: every later run;
  transformers --backend transformers;
and records the seconds to the first prompt, to the first character of the reply to a question typed at
once, and to the end of that reply. Then one-shot --verbose runs (warm cache, and --backend transformers) give first
token and decode tok/s of 128 tokens. Prints best and median of each; the machine is shared, so read them
with the load average printed beside them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pexpect

REPO = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"


def plain_copy(model: Path, into: Path) -> Path:
    into.mkdir()
    for path in model.iterdir():
        if path.is_file() and not path.name.startswith("."):
            (into / path.name).symlink_to(path.resolve())
    return into


def interactive(model: Path, cache: Path, *flags: str) -> tuple[float, float, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CHAT_ARTIFACTS_DIR": str(cache), "NO_COLOR": "1", "TERM": "xterm"}
    argv = ["-m", "chat", str(model), "--temperature", "0", "--no-autosave", *flags]
    started = time.monotonic()
    child = pexpect.spawn(sys.executable, argv, env=env, encoding="utf-8", timeout=600)
    child.expect_exact("User: ")
    prompt = time.monotonic() - started
    child.sendline(QUESTION)
    child.expect_exact(f"{model.name}: ")
    child.expect(r"\S")
    first = time.monotonic() - started
    child.expect_exact("User: ")
    done = time.monotonic() - started
    child.sendeof()
    child.expect(pexpect.EOF)
    return prompt, first, done


def one_shot(model: Path, cache: Path, *flags: str) -> tuple[float, float]:
    argv = [sys.executable, "-m", "chat", str(model), "--temperature", "0", "--verbose", *flags]
    argv += ["--max-new-tokens", "128", "--min-new-tokens", "128", "--prompt", QUESTION]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CHAT_ARTIFACTS_DIR": str(cache)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    found = re.search(r"first token (\d+) ms, ([\d.]+) tok/s", done.stderr)
    if not found:
        raise SystemExit(f"no speed line in: {done.stderr[-500:]}")
    return float(found.group(1)), float(found.group(2))


def summary(values: list[float], unit: str, best=min) -> str:
    return f"best {best(values):.2f} {unit}, median {statistics.median(values):.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chat-first-use-") as work:
        model = plain_copy(args.model, Path(work) / args.model.name)
        cache = Path(work) / "cache"
        times: dict[str, list[tuple[float, float, float]]] = {"cold": [], "warm": [], "transformers": []}
        for round_ in range(args.rounds):
            shutil.rmtree(cache, ignore_errors=True)
            times["cold"].append(interactive(model, cache))
            times["warm"].append(interactive(model, cache))
            times["transformers"].append(interactive(model, cache, "--backend", "transformers"))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f}/{v[-1][1]:.1f} s" for k, v in times.items()))
        print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; rounds {args.rounds}")
        print("seconds from `chat MODEL` to: the prompt | the reply's first character | the reply's end")
        for name, rows in times.items():
            columns = [summary([r[i] for r in rows], "s") for i in range(3)]
            print(f"  {name:12} " + " | ".join(columns))
        speeds: dict[str, list[tuple[float, float]]] = {"auto (cached)": [], "transformers": []}
        for _ in range(args.rounds):
            speeds["auto (cached)"].append(one_shot(model, cache))
            speeds["transformers"].append(one_shot(model, cache, "--backend", "transformers"))
        print("one-shot, 128 new tokens: first token | decode")
        for name, rows in speeds.items():
            first = summary([r[0] for r in rows], "ms")
            decode = summary([r[1] for r in rows], "tok/s", best=max)
            print(f"  {name:14} {first} | {decode}")
        ratio = max(r[1] for r in speeds["auto (cached)"]) / max(r[1] for r in speeds["transformers"])
        print(f"  decode, auto / transformers: {ratio:.2f}x (best of each)")
        print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
