#!/usr/bin/env python3
"""Build the standalone `chat` executables from packaging/chat.spec and print their size and start-up time.

Usage: .venv/bin/python packaging/build_bundle.py [--onedir-only] [--no-build] [--model=ARTIFACT] [--runs=N]

  --onedir-only     build dist/chat/ only (skip the onefile executable)
  --no-build        measure what dist/ holds now
  --model=ARTIFACT  a TorchScript artifact directory to time the first prompt on; default: the demo
                    model's CPU artifact under models/, if exported
  --runs=N          best of N runs for each start-up time [default: 3]

Outputs: dist/chat/chat (onedir: ship the whole dist/chat/ folder) and dist/chat-<version>-linux-<arch>
(onefile). Every bundle run here has an environment with no Python on PATH and no venv, as a user's
machine would. The venv's `chat` is timed the same way, as the baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "packaging" / "chat.spec"
DIST = ROOT / "dist"
WORK = ROOT / "build" / "pyinstaller"
QUESTION = "What is the capital of France?"
PROMPT_TEXT = "User: "  # the interactive prompt, with NO_COLOR set


def version() -> str:
    return re.search(r'__version__\s*=\s*"([^"]+)"', (ROOT / "chat" / "__init__.py").read_text()).group(1)


def onedir_exe() -> Path:
    return DIST / "chat" / "chat"


def onefile_exe() -> Path:
    return DIST / f"chat-{version()}-{sys.platform}-{platform.machine().lower()}"


def venv_chat() -> Path:
    return Path(sys.executable).parent / "chat"


def build(onedir_only: bool) -> float:
    """Run PyInstaller on the spec; return the seconds it took."""
    command = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN"]
    command += ["--distpath", str(DIST), "--workpath", str(WORK), str(SPEC)]
    if onedir_only:
        command += ["--", "--onedir-only"]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def clean_env(home: Path) -> dict[str, str]:
    """No Python and no venv: PATH is an empty folder, HOME a fresh one, and nothing else is set."""
    empty = home / "empty-bin"
    empty.mkdir(exist_ok=True)
    return {"PATH": str(empty), "HOME": str(home), "LANG": "C.UTF-8", "NO_COLOR": "1", "TERM": "xterm"}


def venv_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HOME": str(home), "NO_COLOR": "1", "TERM": "xterm"})
    return env


def best_time(command: list[str], env: dict[str, str], runs: int) -> float:
    """Best wall time of `runs` runs of a command that must succeed."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def time_to_prompt(command: list[str], env: dict[str, str], runs: int) -> float:
    """Best time from start to the interactive prompt (in a pseudo-terminal), then quit with Ctrl+D."""
    import pexpect

    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        child = pexpect.spawn(command[0], command[1:], env=env, encoding="utf-8", timeout=300)
        child.expect_exact(PROMPT_TEXT)
        best = min(best, time.perf_counter() - start)
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
    return best


def one_shot(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Answer QUESTION greedily with --prompt; return (seconds, the reply)."""
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "--prompt", QUESTION, "--temperature", "0", "--max-new-tokens", "24"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} --prompt failed ({done.returncode}):\n{done.stderr}")
    return seconds, done.stdout.strip()


def find_demo_artifact() -> Path | None:
    """The demo model's CPU TorchScript artifact, if exported (float32 first, then any CPU dtype)."""
    found = sorted((ROOT / "models").glob("*/torchscript/cpu-*/chat-artifact.json"))
    found += sorted(p for p in (ROOT / "models").rglob("chat-artifact.json") if p not in found)
    return found[0].parent if found else None


def mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onedir-only", action="store_true")
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    if not args.no_build:
        seconds = build(args.onedir_only)
        print(f"built in {seconds:.0f} s")
    bundles = [("onedir", onedir_exe())]
    if onefile_exe().is_file() and not args.onedir_only:
        bundles.append(("onefile", onefile_exe()))
    for _name, exe in bundles:
        if not exe.is_file():
            raise SystemExit(f"{exe} is missing: build it first (make bundle)")

    print("\nsize")
    print(f"  onedir   {DIST / 'chat'}/  {mb(size_of(DIST / 'chat'))}")
    if len(bundles) > 1:
        print(f"  onefile  {onefile_exe()}  {mb(size_of(onefile_exe()))}")

    artifact = args.model or find_demo_artifact()
    with tempfile.TemporaryDirectory(prefix="chat-bundle-") as tmp:
        home = Path(tmp)
        runs = [("venv", venv_chat(), venv_env(home))] if venv_chat().is_file() else []
        runs += [(name, exe, clean_env(home)) for name, exe in bundles]

        print(f"\nstart-up, best of {args.runs} (bundles run with PATH={home / 'empty-bin'}, no Python)")
        for name, exe, env in runs:
            print(f"  {name:8} --help  {best_time([str(exe), '--help'], env, args.runs):6.2f} s", flush=True)

        if artifact is None:
            print("\nno TorchScript artifact under models/: export the demo model to time the first prompt")
            return 0
        print(f"\ntime to the first prompt on {artifact}, best of {args.runs}")
        base = None
        for name, exe, env in runs:
            seconds = time_to_prompt([str(exe), "--model", str(artifact)], env, args.runs)
            base = base or seconds
            ratio = f"  ({seconds / base:.2f}x the {runs[0][0]}'s)" if name != runs[0][0] else ""
            print(f"  {name:8} {seconds:6.2f} s{ratio}", flush=True)

        print(f"\none-shot --prompt {QUESTION!r} --temperature 0")
        failed = False
        for name, exe, env in runs:
            seconds, reply = one_shot([str(exe), "--model", str(artifact)], env)
            ok = "Paris" in reply
            failed |= not ok
            print(f"  {name:8} {seconds:6.2f} s  {'ok' if ok else 'WRONG'}: {reply[:80]!r}", flush=True)
        return 1 if failed else 0


if __name__ == "__main__":
    if shutil.which("strip") is None:
        raise SystemExit("`strip` (binutils) is needed: the spec strips torch's libraries")
    raise SystemExit(main())
