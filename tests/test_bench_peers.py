"""tools/llama_cpp.py and tools/bench_peers.py without building llama.cpp: the stamp and the tables."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
DEMO_GGUF = TOOLS.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(name: str):
    sys.path.insert(0, str(TOOLS))
    try:
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(TOOLS))
    return module


def test_the_build_is_reused_only_as_stamped(tmp_path, monkeypatch):
    monkeypatch.setenv("CHAT_LLAMA_CPP_DIR", str(tmp_path))
    llama_cpp = load("llama_cpp")
    assert llama_cpp.cache_dir() == tmp_path
    assert not llama_cpp.is_built()
    for path in llama_cpp.programs().values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    (tmp_path / "build.json").write_text(json.dumps({**llama_cpp.stamp_wanted(), "build_s": 1}))
    assert llama_cpp.is_built()
    # Other flags (or sources) than the stamp's: built again.
    (tmp_path / "build.json").write_text(json.dumps({**llama_cpp.stamp_wanted(), "cmake": []}))
    assert not llama_cpp.is_built()


def test_ratios_are_of_the_bests_and_the_median_of_each_rounds_ratio():
    bench_peers = load("bench_peers")

    def side(tok_s: float, rss: float) -> dict:
        return {"decode_64": tok_s, "decode_512": tok_s, "prefill_512": 10 * tok_s, "peak_rss_mib": rss}

    rounds = [
        [{"ours": side(ours, 600), "llama": side(theirs, 300)}] for ours, theirs in ((50, 100), (10, 40), (60, 80))
    ]
    report = {
        "machine": {"cpu": "CPU", "cores": 2, "flags": ["avx2"], "torch": "2", "llama_cpp": "0", "date": "today"},
        "settings": {"model": "m", "threads": 2, "new_tokens": 256, "rounds": 3},
        "load_average": [(1.0, 1.0, 1.0)],
        "minutes": 1.0,
        "answers": {"Q8_0": "Paris."},
        "pairs": [{"ours": "bfloat16", "llama": "BF16", "threads": 2, "llama_server_rss_mib": 400}],
        "rounds": rounds,
    }
    assert bench_peers.ratio(report, 0, "decode_64") == (60 / 100, 0.5)  # median of 0.5, 0.25, 0.75
    assert bench_peers.ratio(report, 0, "peak_rss_mib") == (2.0, 2.0)
    table = bench_peers.render(report)
    assert "| bfloat16 / BF16, 2 threads | 0.60 (0.50) | 0.60 (0.50) | 0.60 (0.50) | 2.00 (2.00) |" in table
    assert "| bfloat16 / BF16, 2 threads | 600 | 400 | 1.50 |" in table  # the best of ours against llama-server


def test_llama_server_as_a_chat_holds_the_file_and_its_whole_kv_cache():
    """The chat measurement reads llama-server's own peak: at a 4096-token context its KV cache alone (f16) is as
    large as the demo model's weights, and llama.cpp reserves it whole at start."""
    bench_peers = load("bench_peers")
    server = bench_peers.llama_cpp.programs()["llama-server"]
    if not (server.is_file() and DEMO_GGUF.is_file()):
        missing = "llama-server or the demo GGUF is missing (make llama-cpp demo-model)"
        if os.environ.get("CHAT_REQUIRE_SERVERS") == "1":  # make test builds both: there it must run
            pytest.fail(missing)
        pytest.skip(missing)
    peak = bench_peers.as_chat_rss(server, DEMO_GGUF, 1)
    kv_cache = 30 * 2 * 4096 * 3 * 64 * 2  # the demo's layers, keys and values, positions, KV heads, head size
    assert peak > (DEMO_GGUF.stat().st_size + kv_cache) / 2**20


def test_a_reply_cut_inside_a_character_is_kept_with_a_replacement(tmp_path, tiny_llama):
    """llama-simple's 32 tokens can end inside a UTF-8 character (random weights print any bytes)."""
    bench_peers = load("bench_peers")
    program = tmp_path / "llama-simple"
    program.write_text("#!/bin/sh\nprintf 'prompt<|im_start|>assistant\\nPar\\267is<|im_end|>'\n")
    program.chmod(0o755)
    assert bench_peers.answer(program, tmp_path / "model.gguf", tiny_llama) == "Par\ufffdis"


def test_a_llama_server_that_never_comes_up_ends_the_run_in_one_line(tmp_path, monkeypatch):
    """A server that neither answers /health nor exits stops the measurement at the guard, and is stopped."""
    bench_peers = load("bench_peers")
    program = tmp_path / "llama-server"
    program.write_text("#!/bin/sh\necho loading forever\nexec sleep 60\n")
    program.chmod(0o755)
    monkeypatch.setattr(bench_peers, "SERVER_START_LIMIT_S", 1)
    with pytest.raises(SystemExit, match="did not answer /health"):
        bench_peers.as_chat_rss(program, tmp_path / "model.gguf", 1)
