"""tools/bench_families.py end to end on tiny shapes: a family's random model built, exported (bfloat16 and
int8) and measured against transformers, and the long-context points, one past the model's trained context
(run on a copy with a raised max_position_embeddings), in under a minute. Speeds are reported, never asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_families.py"


@pytest.mark.slow
def test_bench_families_writes_both_tables(tiny_llama, tmp_path):
    model = tmp_path / "model"  # the long-context model: its artifact is written into it
    shutil.copytree(tiny_llama, model)
    trained = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--tiny",
            "--families=qwen3",
            f"--contexts=32,{trained + 44}",
            "--repeats=1",
            "--long-repeats=2",
            "--long-backends=torchscript",  # transformers at these points: the families' rows cover its worker
            "--prompt=8",
            "--new-tokens=4",
            "--steps=4",
            f"--tokenizer={model}",
            f"--long-model={model}",
            f"--cache={tmp_path / 'cache'}",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "bench-families.md").read_text()
    assert table in done.stdout
    assert "| qwen3 | tiny Qwen3-0.6B |" in table
    assert "| 32 |" in table and f"| {trained + 44} |" in table
    assert "past the trained context" in table.split(f"| {trained + 44} |")[1].splitlines()[0]
    results = json.loads((out / "bench-families.json").read_text())
    family = results["families"][0]
    assert not family["errors"], family["errors"]
    assert set(family["decode_tok_s"]) == {"torchscript bfloat16", "torchscript bfloat16-int8", "transformers bfloat16"}
    assert all(speed > 0 for speed in family["decode_tok_s"].values())
    short, long = results["long_context"]
    assert not short["past_trained_context"] and long["past_trained_context"]
    for point in (short, long):
        assert not point["errors"], point["errors"]
        assert point["torchscript"]["prompt_tokens"] == point["context"] - 4
        assert point["torchscript"]["decode_tok_s"] > 0 and "transformers" not in point
    copy = Path(long["model"])
    assert json.loads((copy / "config.json").read_text())["max_position_embeddings"] == trained + 44
    assert (copy / "model.safetensors").is_symlink()
    assert results["machine"]["load_before"] and results["machine"]["load_after"]
