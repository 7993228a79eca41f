#!/usr/bin/env python3
"""Build llama.cpp once, for comparing against it (tools/bench_peers.py), and print where its programs are.

Usage:
  llama_cpp.py [--rebuild]
  llama_cpp.py gguf MODEL TYPE
  llama_cpp.py (-h | --help)

Options:
  --rebuild   build again even where the stamp says it is built

The sources are the llama.cpp that PyPI's llama-cpp-python sdist vendors (the release pinned below, checked by
sha256): fetched with pip, configured with cmake (Release, GGML_NATIVE=ON, static, without curl, OpenSSL, the
web UI or the tests) and built for llama-bench, llama-quantize, llama-server and llama-simple, about 7 minutes
on 2 idle cores. All of it lives in $CHAT_LLAMA_CPP_DIR, else $XDG_CACHE_HOME/chat/llama.cpp/VERSION (that is
~/.cache/chat/llama.cpp/VERSION), and a stamp file there (build.json) makes later runs reuse the build.

`gguf MODEL TYPE` converts a Hugging Face model directory with llama.cpp's own convert_hf_to_gguf.py (run on
this Python: it needs torch, transformers, numpy, pyyaml, tqdm and requests, all in requirements/) to TYPE:
BF16 and F32 directly, Q8_0 and Q4_0 by llama-quantize from the F32 file; it prints the file's path. The files
are kept in the same folder, remade when the model's files change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from chat.artifact import sha256_file

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is commit 0c1e570 (2026-10-01)
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# Issue 16's flags: nothing that downloads at build or run time (no curl, no prebuilt UI), no TLS, no tests.
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",  # programs that still run if the folder moves
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_COMMIT=0c1e570",  # the sdist has no git history to read it from
]
# llama-server is for a later issue; building it in the same go saves configuring again. llama-simple (greedy,
# a few seconds of compiling) answers one prompt, to check what the quantized files say.
TARGETS = ["llama-bench", "llama-quantize", "llama-server", "llama-simple"]
CONVERTED = {"BF16": "bf16", "F32": "f32"}  # convert_hf_to_gguf.py's --outtype
# convert_hf_to_gguf.py imports sentencepiece even for a model without a tokenizer.model; it is not in
# requirements/, so it goes into the cache folder (pip --target), for the converter only.
CONVERT_DEPS = ["sentencepiece==0.2.3"]
QUANTIZED = ("Q8_0", "Q4_0")  # from the F32 file, by llama-quantize


def cache_dir() -> Path:
    if os.environ.get("CHAT_LLAMA_CPP_DIR"):
        return Path(os.environ["CHAT_LLAMA_CPP_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chat" / "llama.cpp" / VERSION


def source_dir() -> Path:
    return cache_dir() / "llama.cpp"


def programs() -> dict[str, Path]:
    return {name: cache_dir() / "build" / "bin" / name for name in TARGETS}


def stamp_wanted() -> dict:
    return {"version": VERSION, "sha256": SDIST_SHA256, "cmake": CMAKE_FLAGS, "targets": TARGETS}


def is_built() -> bool:
    stamp = cache_dir() / "build.json"
    try:
        done = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    wanted = stamp_wanted()
    return all(done.get(k) == v for k, v in wanted.items()) and all(p.is_file() for p in programs().values())


def ensure_built(rebuild: bool = False, log=sys.stderr) -> dict[str, Path]:
    """llama.cpp's programs, built first unless the stamp says they are (with these sources and flags)."""
    if rebuild or not is_built():
        build(log)
    return programs()


def fetch_sources(log) -> None:
    root = cache_dir()
    sdist = root / SDIST
    if not sdist.is_file() or sha256_file(sdist) != SDIST_SHA256:
        print(f"llama.cpp: fetching {SDIST} ...", file=log, flush=True)
        # pip checks the index's hash; preparing the sdist's metadata costs about a minute.
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, f"llama-cpp-python=={VERSION}", "-d", str(root)], check=True)
        if sha256_file(sdist) != SDIST_SHA256:
            raise SystemExit(f"llama_cpp: {sdist} is not the sdist this script pins (sha256 differs)")
    if (source_dir() / "CMakeLists.txt").is_file():
        return
    print("llama.cpp: unpacking vendor/llama.cpp ...", file=log, flush=True)
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    partial = root / "llama.cpp.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            # Its .git is a submodule's pointer into a repository the sdist lacks: git would only complain.
            if member.name.startswith(prefix) and member.name != prefix + ".git":
                member.name = member.name.removeprefix(prefix)
                members.append(member)
        tar.extractall(partial, members=members, filter="data")
    partial.rename(source_dir())


def build(log) -> None:
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    (root / "build.json").unlink(missing_ok=True)
    fetch_sources(log)
    started = time.monotonic()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"llama.cpp: building {', '.join(TARGETS)} in {root / 'build'} (minutes) ...", file=log, flush=True)
    subprocess.run(["cmake", "-S", str(source_dir()), "-B", str(root / "build"), *generator, *CMAKE_FLAGS], check=True)
    jobs = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    subprocess.run(["cmake", "--build", str(root / "build"), "-j", jobs, "--target", *TARGETS], check=True)
    seconds = time.monotonic() - started
    stamp = {**stamp_wanted(), "build_s": round(seconds), "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    (root / "build.json").write_text(json.dumps(stamp, indent=2) + "\n")
    print(f"llama.cpp: built in {seconds / 60:.1f} min", file=log, flush=True)


def convert_deps(log) -> Path:
    """A folder of the converter's extra packages, installed there once."""
    target = cache_dir() / "convert-deps"
    stamp = target / "installed.json"
    if not stamp.is_file() or json.loads(stamp.read_text()) != CONVERT_DEPS:
        print(f"llama.cpp: installing {', '.join(CONVERT_DEPS)} for the converter ...", file=log, flush=True)
        shutil.rmtree(target, ignore_errors=True)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *CONVERT_DEPS]
        subprocess.run(pip, check=True)
        stamp.write_text(json.dumps(CONVERT_DEPS))
    return target


def model_key(model: Path) -> str:
    """What the converted files were made from: the model's files' names, sizes and times."""
    files = sorted(p for p in model.iterdir() if p.is_file())
    return hashlib.sha256(
        json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]).encode()
    ).hexdigest()[:16]


def gguf(model: Path, kind: str, log=sys.stderr) -> Path:
    """MODEL as a GGUF file of `kind` (BF16, F32, Q8_0, Q4_0), converted first when missing or stale."""
    kind = kind.upper()
    if kind not in (*CONVERTED, *QUANTIZED):
        raise SystemExit(f"llama_cpp: TYPE must be one of {', '.join((*CONVERTED, *QUANTIZED))}, not {kind}")
    model = Path(model).resolve()
    out = cache_dir() / "models" / f"{model.name}-{model_key(model)}-{kind}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    if kind in CONVERTED:
        fetch_sources(log)
        print(f"llama.cpp: converting {model.name} to {kind} ...", file=log, flush=True)
        script = source_dir() / "convert_hf_to_gguf.py"
        argv = [sys.executable, str(script), str(model), "--outtype", CONVERTED[kind], "--outfile", str(partial)]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(convert_deps(log)), os.environ.get("PYTHONPATH")])),
        }
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise SystemExit(f"llama_cpp: converting {model} to {kind} failed (exit {done.returncode})")
    else:
        quantize = ensure_built(log=log)["llama-quantize"]
        source = gguf(model, "F32", log)
        print(f"llama.cpp: quantizing {model.name} to {kind} ...", file=log, flush=True)
        subprocess.run([str(quantize), str(source), str(partial), kind], check=True, capture_output=True)
    partial.rename(out)
    return out


def main() -> int:
    from docopt import docopt

    args = docopt(__doc__)
    if args["gguf"]:
        print(gguf(Path(args["MODEL"]), args["TYPE"]))
        return 0
    for name, path in ensure_built(rebuild=args["--rebuild"]).items():
        print(f"{name} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
