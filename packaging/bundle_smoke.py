#!/usr/bin/env python3
"""Smoke test of the standalone executable (`make bundle-test`, called from CI): build the onedir bundle,
then, from an environment with no Python on PATH and no venv, check that it shows --help, answers
"What is the capital of France?" greedily with Paris (one-shot and in the interactive loop) on the demo
model's TorchScript artifact, and turns a model that needs transformers into a one-line error.

Usage: .venv/bin/python packaging/bundle_smoke.py [--no-build] [--onefile] [--model=ARTIFACT]

  --no-build        test the bundle dist/ holds now
  --onefile         test the onefile executable too (it must have been built: make bundle)
  --model=ARTIFACT  default: the demo model's CPU artifact under models/ (export it first)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import build_bundle as bb


def check(ok: bool, what: str, detail: str = "") -> bool:
    print(f"  {'ok  ' if ok else 'FAIL'}  {what}" + (f"\n{detail}" if detail and not ok else ""), flush=True)
    return ok


LOAD_ALL = """
import ctypes, os, sys
broken = []
for folder, _, files in os.walk(sys.argv[1]):
    for name in files:
        if ".so" in name:
            try:
                ctypes.CDLL(os.path.join(folder, name), mode=os.RTLD_LAZY)
            except OSError as why:
                if "ELF" in str(why) or "aligned" in str(why):
                    broken.append(f"{name}: {why}")
print("\\n".join(broken))
"""


def shared_objects_load(internal: Path) -> bool:
    """The spec strips every binary; stripping breaks some (numpy's OpenBLAS did): dlopen each one."""
    env = {"LD_LIBRARY_PATH": f"{internal}:{internal / 'torch' / 'lib'}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", LOAD_ALL, str(internal)], env=env, capture_output=True, text=True)
    return check(
        done.returncode == 0 and not done.stdout.strip(), "every shared object loads", done.stdout + done.stderr
    )


def smoke(exe: Path, artifact: Path, env: dict[str, str]) -> bool:
    import pexpect

    print(f"{exe}", flush=True)
    ok = True
    done = subprocess.run([str(exe), "--help"], env=env, capture_output=True, text=True, timeout=120)
    ok &= check(done.returncode == 0 and "Usage:" in done.stdout, "--help", done.stdout + done.stderr)

    seconds, reply = bb.one_shot([str(exe), "--model", str(artifact)], env)
    ok &= check("Paris" in reply, f"one-shot --prompt answers Paris ({seconds:.1f} s): {reply[:60]!r}")

    # With no user cache to find them in, the kernels must come from the bundle (not built there, nor torch's).
    no_cache = {**env, "XDG_CACHE_HOME": "/nonexistent"}
    command = [str(exe), "--model", str(artifact), "--prompt", "Hi", "--max-new-tokens", "2"]
    done = subprocess.run(command, env=no_cache, capture_output=True, text=True, timeout=300)
    ok &= check(
        done.returncode == 0 and not any(say in done.stderr for say in ("decoding on torch's", "built chat's native")),
        "decodes on the bundled native kernels",
        done.stderr[-2000:],
    )

    start = time.perf_counter()
    child = pexpect.spawn(
        str(exe), ["--model", str(artifact), "--temperature", "0"], env=env, encoding="utf-8", timeout=300
    )
    child.expect_exact(bb.PROMPT_TEXT)
    child.sendline(bb.QUESTION)
    child.expect_exact(bb.PROMPT_TEXT)
    answer = child.before
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    seconds = time.perf_counter() - start
    ok &= check(
        "Paris" in answer and child.exitstatus == 0, f"interactive loop answers Paris ({seconds:.1f} s)", answer
    )
    ok &= check("(kept in " in child.before, "the chat is kept in its file on leaving", child.before[-2000:])

    done = subprocess.run(
        [str(exe), "--model", "gpt2", "--offline", "--prompt", "hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ok &= check(
        done.returncode != 0 and "Traceback" not in done.stderr and "chat: error:" in done.stderr,
        "a model that needs transformers is a one-line error",
        done.stderr[-2000:],
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--onefile", action="store_true")
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()

    start = time.perf_counter()
    artifact = args.model or bb.find_demo_artifact()
    if artifact is None:
        print("bundle-test: no TorchScript artifact of the demo model under models/: export it first", file=sys.stderr)
        return 1
    if not args.no_build:
        print(f"built the onedir bundle in {bb.build(onedir_only=True):.0f} s", flush=True)
    exes = [bb.onedir_exe()] + ([bb.onefile_exe()] if args.onefile else [])
    ok = True
    with tempfile.TemporaryDirectory(prefix="chat-bundle-") as tmp:
        env = bb.clean_env(Path(tmp))
        print(f"running with PATH={env['PATH']} (empty: no Python, no venv), HOME={env['HOME']}")
        for exe in exes:
            if not exe.is_file():
                print(f"bundle-test: {exe} is missing (make bundle)", file=sys.stderr)
                return 1
            ok &= smoke(exe, artifact, env)
        ok &= shared_objects_load(bb.onedir_exe().parent / "_internal")
    print(f"bundle-test: {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
