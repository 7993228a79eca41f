"""Build the Docker images and check them as a user would (`make image-test`, run by CI).

    python tools/image_test.py [--cpu-only] [--model=DIR]

Uses `docker` when a daemon answers, else podman (with buildah inside) from Debian's packages, installed
here when missing and run as root. Where a registry or the PyTorch index cannot be reached, it stands in
for them: a python:3.11-slim-bookworm made with debootstrap (kept as an image for the next run), and a
one-package index served on 127.0.0.1 from the torch wheel pip finds here. What a host needs on top
(chroot isolation, runc for crun, ulimits it cannot raise, its CA bundle for an intercepting proxy) is
found by trying, not assumed.

The CPU image is checked for: --help; uid 10001; a greedy one-shot answering Paris on the demo model
mounted read-only at /models, on chat's native kernels; decode speed at least 0.7x the venv's on the same
artifact; /data writable by the user; a chat kept on a volume across two runs (--continue). The CUDA
image, on a stand-in base with a CUDA torch where the pytorch image would have it: --help, a CPU
one-shot, and its layout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON_IMAGE = "python:3.11-slim-bookworm"
STANDIN = "localhost/chat-standin-python:3.11-slim-bookworm"
STANDIN_CUDA = "localhost/chat-standin-pytorch:cuda"
CUDA_STANDIN_TORCH = "torch==2.14.1"  # a CUDA build on our machines' disk; PyPI's torch is one elsewhere too
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
CPU_TAG, CUDA_TAG = "localhost/chat:image-test", "localhost/chat:image-test-cuda"
QUESTION = "What is the capital of France?"
HOST_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PACKAGES = ["buildah", "podman", "runc", "debootstrap", "fuse-overlayfs", "uidmap"]
SPEED_FLOOR = 0.7


def say(text: str) -> None:
    print(f"[image-test] {text}", flush=True)


def run(*argv: str, check: bool = True, timeout: float = 3600, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, text=True, capture_output=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise SystemExit(f"[image-test] failed: {' '.join(argv)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def stream(*argv: str) -> None:
    """A long command (a build) with its output shown as it goes."""
    say(" ".join(argv))
    if subprocess.run(argv).returncode != 0:
        raise SystemExit(f"[image-test] failed: {' '.join(argv)}")


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=15).close()
    except OSError:
        return False
    return True


class Engine:
    """How images are built and run on this host: the command and the flags this host turned out to need."""

    def __init__(self) -> None:
        if shutil.which("docker") and run("docker", "info", check=False, timeout=60).returncode == 0:
            self.tool, self.build_flags, self.run_flags = "docker", ["--network=host"], []
            return
        if not (shutil.which("podman") and shutil.which("debootstrap")):
            if os.geteuid() != 0 or not shutil.which("apt-get"):
                raise SystemExit("[image-test] neither a Docker daemon nor podman here: install podman and buildah")
            say("no Docker daemon: installing podman and buildah from Debian's packages")
            run("apt-get", "update", "-q")
            run("apt-get", "install", "-y", "-q", *PACKAGES, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        self.tool, self.build_flags, self.run_flags = "podman", ["--network=host"], []

    def exists(self, image: str) -> bool:
        return run(self.tool, "image", "inspect", image, check=False).returncode == 0

    def at_hand(self, image: str) -> bool:
        """Whether image is here, or could be pulled."""
        return self.exists(image) or run(self.tool, "pull", "-q", image, check=False, timeout=600).returncode == 0

    def standin_made_before(self, real: str, standin: str) -> bool:
        if not self.exists(standin):
            return False
        say(f"{real} cannot be pulled: using the stand-in {standin} made before")
        return True

    def settle(self, base: str) -> None:
        """Find the flags this host needs, with quick tries on the base image."""
        if self.tool != "podman":
            return
        with tempfile.TemporaryDirectory() as context:
            Path(context, "Containerfile").write_text(f"FROM {base}\nRUN true\n")
            for isolation in ([], ["--isolation=chroot"]):
                tried = run(self.tool, "build", *self.build_flags, *isolation, "-q", context, check=False)
                if tried.returncode == 0:
                    self.build_flags += isolation
                    run(self.tool, "rmi", "-f", tried.stdout.strip().splitlines()[-1], check=False)
                    break
            else:
                raise SystemExit(f"[image-test] podman cannot build here:\n{tried.stderr[-2000:]}")
        hard = run("sh", "-c", "ulimit -Hn").stdout.strip()
        limits = ["--ulimit", f"nofile={hard}:{hard}", "--ulimit", "nproc=32768:32768"]
        for flags in ([], ["--runtime", "runc"], limits, ["--runtime", "runc", *limits]):
            if run(self.tool, "run", "--rm", *flags, base, "true", check=False).returncode == 0:
                self.run_flags = flags
                break
        else:
            raise SystemExit("[image-test] podman cannot run a container here (tried crun, runc and ulimits)")
        say(f"podman build {' '.join(self.build_flags)}; run {' '.join(self.run_flags) or '(defaults)'}")

    def build(self, dockerfile: str, tag: str, args: dict[str, str], volumes: list[str]) -> None:
        build_args = [f"--build-arg={k}={v}" for k, v in args.items()]
        mounts = [f"--volume={v}" for v in volumes] if self.tool == "podman" else []
        stream(self.tool, "build", *self.build_flags, *build_args, *mounts, "-f", dockerfile, "-t", tag, str(REPO))

    def run(self, *args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        return run(self.tool, "run", "--rm", *self.run_flags, *args, check=check, timeout=timeout, **kwargs)


def standin_base(engine: Engine) -> str:
    """The real python base where it can be pulled, else a Debian bookworm stand-in made here (and kept)."""
    if engine.at_hand(PYTHON_IMAGE):
        return PYTHON_IMAGE
    if engine.standin_made_before(PYTHON_IMAGE, STANDIN):
        return STANDIN
    say(f"{PYTHON_IMAGE} cannot be pulled: making a stand-in with debootstrap (a few minutes, once)")
    with tempfile.TemporaryDirectory(prefix="chat-rootfs-") as root:
        include = "python3,python3-venv,python3-pip,passwd,ca-certificates"
        stream("debootstrap", "--variant=minbase", f"--include={include}", "bookworm", root, debian_mirror())
        for name, target in (("python", "python3"), ("pip", "pip3")):  # as the python image names them
            if not Path(root, "usr/bin", name).exists():
                Path(root, "usr/bin", name).symlink_to(target)
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        run(engine.tool, "import", "-", STANDIN, stdin=tar.stdout)
        tar.wait()
    return STANDIN


def debian_mirror() -> str:
    """The Debian mirror apt uses here (debootstrap's default may not be reachable)."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            found = re.search(r"(?:URIs:|deb)\s+(https?://\S+/debian)\b", path.read_text())
            if found:
                return found.group(1)
    return "http://deb.debian.org/debian"


@contextlib.contextmanager
def torch_index(pin: str) -> Iterator[str]:
    """PyTorch's CPU index where it answers, else a one-package index on 127.0.0.1 with the wheel pip finds."""
    if reachable(f"{TORCH_INDEX}/torch/"):
        yield TORCH_INDEX
        return
    with tempfile.TemporaryDirectory(prefix="chat-index-") as root:
        wheels = Path(root, "torch")
        run(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), pin)
        links = "".join(f'<a href="{w.name}">{w.name}</a>\n' for w in wheels.glob("*.whl"))
        (wheels / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
        handler = functools.partial(QuietHandler, directory=root)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        say(f"PyTorch's index cannot be reached: serving {pin} on 127.0.0.1:{server.server_port}")
        try:
            yield f"http://127.0.0.1:{server.server_port}/"
        finally:
            server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def trust(base_bundle_differs: bool) -> tuple[dict[str, str], list[str]]:
    """Build args and mounts for pip inside the build: the host's CA bundle where TLS here is signed by a CA
    the base does not know (an intercepting proxy); nothing elsewhere."""
    if not base_bundle_differs:
        return {}, []
    return {"PIP_CERT": str(HOST_BUNDLE)}, [f"{HOST_BUNDLE}:{HOST_BUNDLE}:ro"]


def needs_host_bundle() -> bool:
    """Whether PyPI's certificate here is signed by a CA outside certifi's list (the one pip uses)."""
    import ssl

    try:
        import certifi
    except ImportError:
        return HOST_BUNDLE.is_file()
    context = ssl.create_default_context(cafile=certifi.where())
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=15, context=context).close()
    except OSError:
        return HOST_BUNDLE.is_file()
    return False


def decode_speed(stderr: str) -> float:
    found = re.search(r"([\d.]+) tok/s", stderr)
    if not found:
        raise SystemExit(f"[image-test] no speed line in:\n{stderr[-2000:]}")
    return float(found.group(1))


def check_cpu_image(engine: Engine, model: Path) -> None:
    mount = f"--volume={model}:/models/{model.name}:ro"
    help_text = engine.run(CPU_TAG, "--help").stdout
    assert "Usage:" in help_text, help_text
    uid = engine.run("--entrypoint", "id", CPU_TAG, "-u").stdout.strip()
    assert uid == "10001", f"the image runs as {uid}, not 10001"
    say("--help and uid 10001: ok")

    one_shot = ("--temperature", "0", "--max-new-tokens", "96", "--min-new-tokens", "96", "--verbose")
    venv_chat = str(REPO / ".venv" / "bin" / "chat")
    image, venv = [], []
    for _ in range(3):  # alternated, best of each
        result = engine.run(mount, CPU_TAG, *one_shot, "--prompt", QUESTION)
        assert "Paris" in result.stdout, result.stdout + result.stderr
        assert "native kernels" not in result.stderr and "Traceback" not in result.stderr, result.stderr
        image.append(decode_speed(result.stderr))
        local = run(venv_chat, str(model), *one_shot, "--prompt", QUESTION, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        venv.append(decode_speed(local.stderr))
    status = engine.run(mount, "-i", CPU_TAG, input="!status\n").stdout
    assert "native AVX" in status, status
    ratio = max(image) / max(venv)
    say(
        f"Paris, on native kernels; decode best of 3: image {max(image):.1f}, venv {max(venv):.1f} tok/s ({ratio:.2f}x)"
    )
    assert ratio >= SPEED_FLOOR, f"the image decodes at {ratio:.2f}x the venv's, under {SPEED_FLOOR}x"

    volume = f"chat-image-test-{os.getpid()}"
    try:
        data = f"--volume={volume}:/data"
        engine.run(data, "--entrypoint", "sh", CPU_TAG, "-c", "touch /data/written && rm /data/written")
        kept_chat(engine, data, mount)
        exported_on_first_use(engine, data, mount)
    finally:
        run(engine.tool, "volume", "rm", "-f", volume, check=False)
    say("/data writable by the user, a chat kept on it across two runs, an export on first use cached there: ok")


def exported_on_first_use(engine: Engine, data: str, mount: str) -> None:
    """The demo model has no float32 artifact: the first run exports one into /data, the next one reuses it,
    and with /data read-only a new export is one line and the chat answers on transformers."""
    one_shot = (CPU_TAG, "--dtype", "float32", "--temperature", "0", "--prompt", QUESTION)
    first = engine.run(data, mount, *one_shot)
    assert "making a native artifact" in first.stderr and "Paris" in first.stdout, first.stdout + first.stderr
    assert "cached in /data/cache/chat/artifacts/" in first.stderr, first.stderr
    again = engine.run(data, mount, *one_shot)
    assert "making" not in again.stderr and "Paris" in again.stdout, again.stdout + again.stderr
    listed = engine.run(data, CPU_TAG, "--cache").stdout
    assert "cpu-float32-" in listed, listed
    read_only = engine.run(f"{data}:ro", mount, *one_shot, "--quantize", "int8")  # not cached yet
    assert "cannot be written" in read_only.stderr and "Paris" in read_only.stdout, read_only.stdout + read_only.stderr


def kept_chat(engine: Engine, data: str, mount: str) -> None:
    """A chat at a terminal in one run, resumed with --continue in the next, both on the /data volume."""
    import pexpect

    argv = ["run", "--rm", "-it", "--env=NO_COLOR=1", *engine.run_flags, data, mount, CPU_TAG, "--temperature", "0"]
    child = pexpect.spawn(engine.tool, argv, encoding="utf-8", timeout=300)
    child.expect_exact("User: ")
    child.sendline(QUESTION)
    child.expect_exact("Paris")
    child.expect_exact("User: ")
    child.sendeof()
    child.expect_exact("(kept in /data/")
    child.expect(pexpect.EOF)
    child.close()
    again = engine.run(data, mount, "-i", CPU_TAG, "--continue", "--temperature", "0", input="And of Italy?\n")
    listed = engine.run(data, CPU_TAG, "--chats").stdout
    assert again.returncode == 0 and "4 messages" in listed, listed + again.stderr


def cuda_base(engine: Engine, base: str) -> str:
    """The pytorch/pytorch CUDA image where it can be pulled; else a stand-in with what Dockerfile.cuda
    relies on: the base's own `python` with a CUDA torch in its site-packages, which the venv sees through
    --system-site-packages. Its torch is the CUDA build pip finds here for CUDA_STANDIN_TORCH (the base
    image's own version may not be at hand). Kept for the next run."""
    real = re.search(r"ARG TORCH_IMAGE=(\S+)", (REPO / "Dockerfile.cuda").read_text()).group(1)
    if engine.at_hand(real):
        return real
    if engine.standin_made_before(real, STANDIN_CUDA):
        return STANDIN_CUDA
    say(f"{real} cannot be pulled: making a stand-in with {CUDA_STANDIN_TORCH} (several GB, once)")
    with tempfile.TemporaryDirectory(prefix="chat-cuda-") as context:
        wheels = Path(context, "wheels")
        run(sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), CUDA_STANDIN_TORCH)
        Path(context, "Containerfile").write_text(
            f"FROM {base}\n"
            "RUN pip install --break-system-packages --no-cache-dir --no-index --find-links /wheels "
            f"'{CUDA_STANDIN_TORCH}'\n"
        )
        mount = f"--volume={wheels}:/wheels:ro"
        stream(
            engine.tool,
            "build",
            *engine.build_flags,
            mount,
            "-t",
            STANDIN_CUDA,
            "-f",
            f"{context}/Containerfile",
            context,
        )
    return STANDIN_CUDA


def check_cuda_image(engine: Engine, model: Path) -> None:
    """No GPU here: --help, a CPU one-shot, and the layout (the venv sees the base's torch, uid 10001, the
    exporter installed and at /opt/chat/scripts)."""
    help_text = engine.run(CUDA_TAG, "--help").stdout
    assert "Usage:" in help_text, help_text
    layout = engine.run(
        "--entrypoint",
        "sh",
        CUDA_TAG,
        "-c",
        "id -u; python -c 'import torch; print(torch.__file__, torch.version.cuda)'; "
        "test -f /opt/chat/scripts/export_torchscript.py && python -m chat.export --help | head -1",
    ).stdout.split("\n")
    assert layout[0] == "10001", layout
    assert not layout[1].startswith("/opt/chat/") and not layout[1].endswith(" None"), layout  # the base's
    assert "export" in layout[2].lower(), layout
    mount = f"--volume={model}:/models/{model.name}:ro"
    result = engine.run(mount, CUDA_TAG, "--device", "cpu", "--temperature", "0", "--prompt", QUESTION)
    assert "Paris" in result.stdout and "Traceback" not in result.stderr, result.stdout + result.stderr
    say("CUDA image: --help, its layout (uid 10001, the base's CUDA torch, the exporter) and a CPU one-shot: ok")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true", help="build and check only the CPU image")
    parser.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    options = parser.parse_args()
    model = Path(options.model).resolve()
    if not (model / "torchscript").is_dir():
        raise SystemExit(f"[image-test] {model} has no TorchScript artifact: run `make demo-artifact`")
    started = time.monotonic()
    engine = Engine()
    base = standin_base(engine)
    engine.settle(base)
    cert_args, cert_mounts = trust(needs_host_bundle())
    pin = next(
        line for line in (REPO / "requirements" / "torch.txt").read_text().splitlines() if line.startswith("torch")
    )
    with torch_index(pin) as index:
        engine.build("Dockerfile", CPU_TAG, {"PYTHON_IMAGE": base, "TORCH_INDEX_URL": index, **cert_args}, cert_mounts)
    check_cpu_image(engine, model)
    if not options.cpu_only:
        args = {"TORCH_IMAGE": cuda_base(engine, base), "PYTHON_IMAGE": base, **cert_args}
        engine.build("Dockerfile.cuda", CUDA_TAG, args, cert_mounts)
        check_cuda_image(engine, model)
    say(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
