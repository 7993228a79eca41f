"""The remote engine against real servers started here on 127.0.0.1: `transformers serve` on the demo model and
llama.cpp's llama-server on its Q4_1 GGUF (with an API key). `make test` installs the first
(requirements/serve.txt) and builds the second (make llama-cpp), and sets CHAT_REQUIRE_SERVERS=1, so there a
missing server fails instead of skipping."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from conftest import DEMO_MODEL, REPO
from test_cli import run_chat
from test_terminal import PROMPT, quit_with_eof, spawn

pytestmark = [pytest.mark.demo, pytest.mark.slow]

DEMO_GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_VERSION = "0.3.36"  # tools/llama_cpp.py's
KEY = "test-key-4f1c"
FRANCE = "What is the capital of France?"


@dataclass
class Server:
    kind: str
    process: subprocess.Popen
    url: str  # the API base, .../v1
    model: str  # the id it serves
    log: Path
    key: str | None = None

    def cpu_seconds(self) -> float:
        """The server's CPU time so far (all threads): it grows while it generates."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


def missing(what: str) -> None:
    if os.environ.get("CHAT_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{what} (make test installs and builds the servers)")
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HOME": str(tmp), "NO_COLOR": "1"}


@contextlib.contextmanager
def started(kind: str, argv: list[str], port: int, tmp: Path, model: str, key: str | None = None) -> Iterator[Server]:
    """The server up (its /health answering 200), stopped afterwards; its log's tail on a failed start."""
    log = tmp / f"{kind}.log"
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=server_env(tmp))
    server = Server(kind, process, f"http://127.0.0.1:{port}/v1", model, log, key)
    try:
        deadline = time.monotonic() + 300  # a guard for a busy machine, not a timing
        while True:
            if process.poll() is not None:
                pytest.fail(f"{kind} exited with {process.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"{kind} did not answer /health:\n{server.log_tail()}")
            time.sleep(0.3)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def transformers_server(tmp_path_factory) -> Iterator[Server]:
    program = Path(sys.executable).with_name("transformers")
    if not (program.exists() and shutil.which("uvicorn", path=str(program.parent))):
        missing("transformers serve is not installed (pip install -r requirements/serve.txt)")
    if not (DEMO_MODEL / "config.json").is_file():
        missing("the demo model is not fetched (make demo-model)")
    port = free_port()
    argv = [str(program), "serve", str(DEMO_MODEL), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with started("transformers", argv, port, tmp_path_factory.mktemp("transformers-serve"), str(DEMO_MODEL)) as s:
        yield s


def llama_server_program() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    folder = os.environ.get("CHAT_LLAMA_CPP_DIR") or str(Path(cache) / "chat" / "llama.cpp" / LLAMA_CPP_VERSION)
    return Path(folder) / "build" / "bin" / "llama-server"


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory) -> Iterator[Server]:
    program = llama_server_program()
    if not program.is_file():
        missing(f"llama-server is not built ({program}; make llama-cpp)")
    if not DEMO_GGUF.is_file():
        missing("the demo GGUF is not fetched (make demo-model)")
    port = free_port()
    argv = [str(program), "-m", str(DEMO_GGUF), "--host", "127.0.0.1", "--port", str(port), "-c", "2048", "-t", "1"]
    argv += ["-np", "1", "--api-key", KEY, "-a", "smollm2"]
    with started("llama.cpp", argv, port, tmp_path_factory.mktemp("llama-server"), "smollm2", KEY) as s:
        yield s


@pytest.fixture(params=["transformers", "llama.cpp"])
def server(request) -> Server:
    return request.getfixturevalue("transformers_server" if request.param == "transformers" else "llama_server")


def key_args(server: Server, tmp_path: Path) -> list[str]:
    if server.key is None:
        return []
    path = tmp_path / "key"
    path.write_text(server.key + "\n")
    return ["--api-key-file", str(path)]


def chat_at(server: Server, tmp_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env_args = ["--save-dir", str(tmp_path / "kept")]
    return run_chat(server.model, "--base-url", server.url, *key_args(server, tmp_path), *env_args, *args, stdin=stdin)


def direct_reply(server: Server, messages: list[dict], max_tokens: int) -> str:
    """What the server answers without chat in between (greedy, not streamed)."""
    headers = {"Authorization": f"Bearer {server.key}"} if server.key else {}
    body = {"model": server.model, "messages": messages, "temperature": 0.0, "max_tokens": max_tokens}
    answer = httpx2.post(f"{server.url}/chat/completions", json=body, headers=headers, timeout=120)
    answer.raise_for_status()
    return answer.json()["choices"][0]["message"]["content"].strip()


def test_greedy_reply_is_the_servers_own(server, tmp_path):
    done = chat_at(server, tmp_path, "--prompt", FRANCE, "--temperature", "0", "--max-new-tokens", "20")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == direct_reply(server, [{"role": "user", "content": FRANCE}], 20)
    if server.kind == "transformers":  # llama.cpp's Q4_1 quantizes activations: its greedy reply is not Paris
        assert "Paris" in done.stdout


def test_multi_turn_regen_undo_status_and_save(server, tmp_path):
    out = tmp_path / "out.json"
    script = "\n".join([FRANCE, "And what is the capital of Italy?", "!regen", "!status", "!undo", f"!save {out}"])
    done = chat_at(server, tmp_path, "--temperature", "0", "--max-new-tokens", "12", "--verbose", stdin=script)
    assert done.returncode == 0, done.stderr
    stats = [line for line in done.stderr.splitlines() if line.startswith("prompt ")]
    prompts = [int(line.split()[1]) for line in stats]
    replies = [int(line.split()[4]) for line in stats]
    assert len(stats) == 3 and prompts[1] > prompts[0] + replies[0]  # the second turn was sent the first
    assert prompts[2] == prompts[1]  # !regen asks the same again
    rows = {line.split()[0]: line.split(None, 1)[1] for line in done.stdout.splitlines() if len(line.split()) > 1}
    assert rows["server"].startswith(server.url) and rows["model"] == server.model
    assert "temperature=0.0" in rows["sent"] and "max_tokens=12" in rows["sent"]
    saved = json.loads(out.read_text())
    assert saved["backend"] == "remote" and saved["base_url"] == server.url and saved["model"] == server.model
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert server.key is None or server.key not in done.stdout + done.stderr + json.dumps(saved)


def test_continue_reconnects_to_the_server(server, tmp_path):
    kept = tmp_path / "kept"
    first = chat_at(server, tmp_path, "--temperature", "0", "--max-new-tokens", "8", stdin=f"{FRANCE}\n!save\n")
    assert first.returncode == 0, first.stderr
    # No model, no --base-url: the kept chat says where it was.
    again = run_chat("--continue", "--save-dir", str(kept), *key_args(server, tmp_path), "--prompt", "And Italy?")
    assert again.returncode == 0, again.stderr
    (file,) = kept.glob("chat-*.json")
    data = json.loads(file.read_text())
    assert data["base_url"] == server.url and [m["role"] for m in data["messages"]] == ["user", "assistant"] * 2


def test_ctrl_c_stops_the_reply_and_the_server(server, tmp_path):
    args = ["--base-url", server.url, *key_args(server, tmp_path), "--temperature", "1", "--max-new-tokens", "1500"]
    child = spawn(server.model, *args, tmp_path=tmp_path)
    child.sendline("Write a very long story about a dragon who learns to bake bread, with many chapters.")
    child.expect_exact(": ")  # the reply's label: the server streams
    child.expect(r"\w+ \w+ \w+", timeout=60)  # some words of it
    child.sendintr()
    child.expect_exact("(interrupted; the partial reply is kept)", timeout=10)
    child.expect_exact(PROMPT)
    time.sleep(1.5)  # the server's cancellation lands
    before = server.cpu_seconds()
    time.sleep(2)
    # Generating takes about a CPU-second a second: what is left is the server idling.
    assert server.cpu_seconds() - before < 0.5, server.log_tail()
    quit_with_eof(child)


def test_a_model_the_server_does_not_serve_is_one_line_naming_what_it_serves(server, tmp_path):
    if server.kind == "llama.cpp":
        pytest.skip("llama-server answers whatever model is named")
    done = run_chat("no-such-model", "--base-url", server.url, "--prompt", "hi")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and server.model in done.stderr and "no-such-model" in done.stderr


def test_without_the_key_the_server_refuses_in_one_line(llama_server, tmp_path, monkeypatch):
    monkeypatch.delenv("CHAT_API_KEY", raising=False)
    done = run_chat("--base-url", llama_server.url, "--prompt", "hi")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"the server at {llama_server.url} wants an API key" in done.stderr and "--api-key-file" in done.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-key")
    done = run_chat("--base-url", llama_server.url, "--api-key-file", str(wrong), "--prompt", "hi")
    assert done.returncode == 1 and "refused the API key" in done.stderr and "not-the-key" not in done.stderr


def test_no_server_listening_is_one_line():
    url = f"http://127.0.0.1:{free_port()}/v1"
    done = run_chat("--base-url", url, "--prompt", "hi")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        == f"chat: error: nothing answers at {url}: start the server (docs/remote.md) or check --base-url"
    )


def test_remote_mode_imports_neither_torch_nor_transformers(transformers_server, tmp_path):
    code = (
        "import sys; from chat.cli import main; "
        f"code = main(['--base-url', {transformers_server.url!r}, '--prompt', 'hi', '--max-new-tokens', '2']); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules)); sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
