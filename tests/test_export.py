"""Export to a TorchScript artifact: verify against transformers, the manifest, atomic writes, refusals,
the command line (python -m chat.export), the developer tools in tools/, and the demo model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_DECODER

import chat.export
from chat import native
from chat.artifact import MANIFEST, artifact_dir_for, read_manifest, sha256_file
from chat.backends.base import LoadOptions
from chat.backends.torchscript_backend import TorchScriptBackend
from chat.backends.transformers_backend import TransformersBackend
from chat.errors import ChatError, UsageError
from chat.export import export
from chat.generation import ReplyStream
from chat.lean.ops import quiet_torchscript
from chat.params import GenerationParams

REPO = Path(__file__).resolve().parent.parent
EXPORTER = [sys.executable, "-m", "chat.export"]
TOOLS = REPO / "tools"


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_export_verifies_against_transformers(request, tmp_path, model):
    source = request.getfixturevalue(model)
    messages = []
    out = export(str(source), tmp_path / "art", max_len=128, verify=True, progress=messages.append)
    assert sum("32 greedy tokens identical" in m for m in messages) == 3
    manifest = read_manifest(out)
    assert manifest["architecture"] == ("gpt2" if model == "tiny_gpt2" else "llama")
    assert manifest["dtype"] == "float32" and manifest["device"] == "cpu" and manifest["max_len"] == 128
    assert manifest["torch_version"] == torch.__version__
    assert manifest["source"]["path"] == str(source) and len(manifest["source"]["sha256"]) == 64
    assert manifest["eos_token_ids"] == [2 if model == "tiny_llama" else 0]
    assert manifest["vocab_size"] == json.loads((source / "config.json").read_text())["vocab_size"]
    files = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == files
    assert {"model.ts", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(files)
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(out / name)
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary directory left


def tiny_family_model(directory: Path, tokenizer_from: Path, model_type: str) -> Path:
    """A 2-layer model of another supported family, random weights, the tiny llama's tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(tokenizer_from / name, directory / name)
    extra = {
        "mistral": {"sliding_window": 4096},
        "qwen2": {"tie_word_embeddings": False},  # q/k/v biases, an untied head
        "phi3": {"partial_rotary_factor": 0.5},  # fused qkv and gate_up, partial RoPE
    }[model_type]
    config = AutoConfig.for_model(
        model_type,
        vocab_size=300,
        **TINY_DECODER,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model_type == "qwen2":  # random init leaves biases at zero: make them count
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0, 0.5)
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "phi3"])
def test_other_families_verify(tiny_llama, tmp_path, model_type):
    source = tiny_family_model(tmp_path / model_type, tiny_llama, model_type)
    messages = []
    out = export(str(source), tmp_path / "art", max_len=128, verify=True, progress=messages.append)
    assert sum("32 greedy tokens identical" in m for m in messages) == 3
    assert read_manifest(out)["model_type"] == model_type


# quantize, activations, the dtypes a layer's weights and scales have in the file
QUANTIZED = [
    ("int8", "float32", torch.int8, torch.float32),
    ("int8", "bfloat16", torch.int8, torch.float32),
    ("int4", "bfloat16", torch.uint8, torch.float16),
]


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize(("quantize", "dtype", "weights", "scales"), QUANTIZED)
def test_quantized_export_verifies_on_the_same_rounded_weights_and_chats(
    request, tmp_path, model, quantize, dtype, weights, scales
):
    """--quantize: a layer's matmul weights are int8 rows or int4 groups in the file (the head int8 either way),
    --verify holds the artifact to transformers running the same rounded weights, and the chat says what it
    runs."""
    if native.supported():
        pytest.skip(f"{quantize} decodes on chat's native kernels: {native.supported()}")
    messages = []
    source = request.getfixturevalue(model)
    out = export(
        str(source),
        tmp_path / "art",
        dtype=dtype,
        max_len=128,
        quantize=quantize,
        verify=True,
        progress=messages.append,
    )
    assert sum("32 greedy tokens identical" in m for m in messages) == 3
    assert read_manifest(out)["quantization"] == quantize
    backend = TorchScriptBackend(out)
    try:
        with quiet_torchscript():
            loaded = torch.jit.load(str(out / "model.ts"))
        qkv = getattr(loaded.blocks, "0").attention.qkv.linear
        assert qkv.weight.dtype == weights and qkv.scale.dtype == scales
        head = loaded.head.proj.linear
        assert head.weight.dtype == torch.int8
        # The tied embedding is kept once: its lookups read the head's int8 rows.
        assert loaded.embedding.weight.data_ptr() == head.weight.data_ptr()
        assert backend.info.runs_on.startswith(f"{dtype}, {quantize} weights, native")
        # Freezing at load must not fold prefill's dequantize into float copies of every weight.
        assert str(backend.module.prefill.graph).count("chat::dequantize") >= 4
        stream = ReplyStream(backend, [5, 6, 7], GenerationParams(max_new_tokens=6, temperature=0.0), None, [])
        assert len(list(stream)) > 0 and stream.stats.new_tokens == 6
    finally:
        backend.close()


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2", "qwen2", "phi3", "mistral"])
def test_int8_logits_are_transformers_on_the_rounded_weights(request, tmp_path, model):
    """Prefill and decode logits of a float32 int8 artifact against transformers running the same rounded
    weights: the same numbers but for summing order (greedy tokens alone barely move on random weights)."""
    if native.supported():
        pytest.skip(f"int8 decodes on chat's native kernels: {native.supported()}")
    from transformers import AutoModelForCausalLM

    from chat.export.quantize import round_model_weights

    if model.startswith("tiny_"):
        source = request.getfixturevalue(model)
    else:  # q/k/v biases (qwen2), fused projections (phi3)
        source = tiny_family_model(tmp_path / model, request.getfixturevalue("tiny_llama"), model)
    backend = TorchScriptBackend(export(str(source), tmp_path / "art", max_len=64, quantize="int8"))
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    round_model_weights(hf, "int8")
    ids = [5, 9, 2, 7, 11, 3, 8]
    try:
        with torch.no_grad():
            expected = hf(input_ids=torch.tensor([ids])).logits[0]
        got = [backend.prefill(ids[:4])] + [backend.decode(token) for token in ids[4:]]
        for step, logits in enumerate(got, start=3):
            torch.testing.assert_close(logits.float(), expected[step], rtol=1e-4, atol=1e-4)
    finally:
        backend.close()


def test_int4_logits_are_transformers_on_the_rounded_weights(tiny_llama, tmp_path):
    """Prefill and decode logits of an int4 artifact against transformers running the same rounded weights in
    bfloat16: within bfloat16's rounding of the activations."""
    if native.supported():
        pytest.skip(f"int4 decodes on chat's native kernels: {native.supported()}")
    from transformers import AutoModelForCausalLM

    from chat.export.quantize import round_model_weights

    backend = TorchScriptBackend(
        export(str(tiny_llama), tmp_path / "art", dtype="bfloat16", max_len=64, quantize="int4")
    )
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    round_model_weights(hf, "int4")
    ids = [5, 9, 2, 7, 11, 3, 8]
    try:
        with torch.no_grad():
            expected = hf.bfloat16()(input_ids=torch.tensor([ids])).logits[0].float()
        got = [backend.prefill(ids[:4])] + [backend.decode(token) for token in ids[4:]]
        for step, logits in enumerate(got, start=3):
            torch.testing.assert_close(logits.float(), expected[step], rtol=0.05, atol=0.05)
    finally:
        backend.close()


def test_rounding_to_int4_is_per_group_and_rounding_twice_changes_nothing():
    from chat.export.quantize import quantize_groups, round_to
    from chat.lean.ops import int4_weights

    torch.manual_seed(0)
    w = torch.randn(40, 128) * torch.logspace(-3, 2, 40)[:, None]  # rows of very different sizes
    w[3] = 0
    w[5, 32:64] = 0.25  # a constant group
    packed, scales = quantize_groups(w)
    assert packed.shape == (40, 64) and scales.shape == (40, 2, 4) and scales.dtype == torch.float16
    once = int4_weights(packed, scales)
    assert torch.equal(once[3], w[3]) and torch.equal(once[5, 32:64], w[5, 32:64])
    groups, made = w.reshape(40, 4, 32), once.reshape(40, 4, 32)
    span = groups.amax(dim=2) - groups.amin(dim=2)
    assert ((made - groups).abs().amax(dim=2) <= span / 15 * 0.6 + span * 0.1).all()  # within a step, or a trim
    assert torch.equal(round_to("int4", once), once)
    odd = torch.randn(3, 96)  # rows of no whole number of 64-weight runs stay int8
    assert torch.equal(round_to("int4", odd), round_to("int8", odd))


def test_rounding_to_int8_is_per_row_and_rounding_twice_changes_nothing():
    from chat.export.quantize import quantize_rows, round_to

    torch.manual_seed(0)
    w = torch.randn(40, 24) * torch.logspace(-3, 2, 40)[:, None]  # rows of very different sizes
    w[3] = 0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().amax(dim=1)[w.abs().amax(dim=1) > 0].eq(127).all()
    assert scale[3] == 1 and q[3].eq(0).all()
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()  # half a step at most
    once = round_to("int8", w)
    assert torch.equal(quantize_rows(once)[0], q) and torch.allclose(round_to("int8", once), once, rtol=1e-6, atol=0)


def test_tied_weights_are_stored_once(tiny_llama, tmp_path):
    out = export(str(tiny_llama), tmp_path / "art", max_len=32)
    import zipfile

    weights = (tiny_llama / "model.safetensors").stat().st_size  # float32, embedding stored once
    with zipfile.ZipFile(out / "model.ts") as archive:  # tensors, beside the module's code
        tensors = sum(item.file_size for item in archive.infolist() if "/data/" in item.filename)
    assert tensors < weights * 1.1


def test_reexport_replaces_and_failure_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    out = export(str(tiny_llama), tmp_path / "art", max_len=32)
    export(str(tiny_llama), out, max_len=48)
    assert read_manifest(out)["max_len"] == 48

    def fail(*args):
        raise ChatError("verify failed: on purpose")

    monkeypatch.setattr(chat.export, "verify_artifact", fail)
    with pytest.raises(ChatError, match="on purpose"):
        export(str(tiny_llama), out, max_len=64, verify=True)
    assert read_manifest(out)["max_len"] == 48  # the old artifact is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_refusals(tiny_llama, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an artifact directory"):
        export(str(tiny_llama), tmp_path / "busy")
    with pytest.raises(ChatError, match="beyond what this model supports"):
        export(str(tiny_llama), tmp_path / "long", max_len=100_000)
    for model_type, refusal in (
        ("bloom", "'bloom' models to TorchScript is not supported yet"),
        ("mamba", "'mamba' models keep recurrent state .* use --backend transformers"),
    ):
        other = tmp_path / model_type
        other.mkdir()
        (other / "config.json").write_text(json.dumps({"model_type": model_type}))
        (other / "model.safetensors").write_bytes(b"")
        with pytest.raises(ChatError, match=refusal):
            export(str(other), tmp_path / "out")
    with pytest.raises(UsageError, match="--quantize=int2: use int8 or int4"):
        export(str(tiny_llama), tmp_path / "out", quantize="int2")
    with pytest.raises(UsageError, match="--quantize int4 is for --dtype bfloat16"):
        export(str(tiny_llama), tmp_path / "out", quantize="int4")
    with pytest.raises(UsageError, match="--quantize int8 is for --device cpu"):
        export(str(tiny_llama), tmp_path / "out", device="cuda", quantize="int8")


def test_command_line(tiny_llama, tmp_path):
    out = tmp_path / "art"
    done = subprocess.run(
        [*EXPORTER, str(tiny_llama), str(out), "--max-len=40", "--dtype=bfloat16"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "tracing" in done.stderr and "Warning" not in done.stderr
    assert read_manifest(out)["dtype"] == "bfloat16"
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    for args, message in [
        ([str(tiny_llama), str(tmp_path / "x"), "--dtype=int8"], "--dtype=int8"),
        ([str(tiny_llama), str(tmp_path / "x"), "--max-len=-5"], "--max-len=-5"),
        ([str(tiny_llama)], "give MODEL and OUTDIR"),
        ([str(tiny_llama), str(blocked / "art")], "cannot write in"),
    ]:
        bad = subprocess.run([*EXPORTER, *args], capture_output=True, text=True, check=False)
        assert bad.returncode == 2, args
        assert bad.stderr.strip().count("\n") == 0 and message in bad.stderr


def test_help_works_from_any_folder_without_torch(tmp_path):
    """An installed chat exports from anywhere (the Docker images have no checkout), and --help imports no torch."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "chat.export", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert done.stdout.startswith("Export a Hugging Face causal LM") and "chat.export MODEL OUTDIR" in done.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()}
    assert "chat" in imported and "torch" not in imported and "transformers" not in imported


def test_script_in_the_checkout_runs_the_same_command_line(tmp_path):
    script = REPO / "scripts" / "export_torchscript.py"
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    module = subprocess.run([*EXPORTER, "--help"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0 and done.stdout == module.stdout


@pytest.mark.demo
@pytest.mark.slow
def test_demo_model_float32_verifies(demo_model, tmp_path):
    """The demo model: float32 greedy tokens identical to transformers (the export's own --verify)."""
    messages = []
    export(str(demo_model), tmp_path / "f32", max_len=512, verify=True, progress=messages.append)
    assert sum("32 greedy tokens identical" in m for m in messages) == 3


@pytest.mark.demo
@pytest.mark.slow
def test_demo_model_bfloat16_answers(demo_model, tmp_path):
    """The dtype `make demo` exports for the CPU still answers the capital question greedily."""
    artifact = export(str(demo_model), tmp_path / "bf16", dtype="bfloat16", max_len=512)
    backend = TorchScriptBackend(artifact)
    prompt = backend.tokenizer.render([{"role": "user", "content": "What is the capital of France?"}])
    ids = backend.tokenizer.encode(prompt, add_special_tokens=False)
    stream = ReplyStream(backend, ids, GenerationParams(temperature=0.0, max_new_tokens=20), torch.Generator())
    assert "Paris" in "".join(stream)


def test_demo_artifact_location_is_what_auto_looks_for(tmp_path):
    """`make demo` exports to MODEL/torchscript/cpu-bfloat16, the place auto looks first on this kind of CPU."""
    from chat.backends.select import find_artifact, preferred_dtypes

    target = artifact_dir_for(tmp_path, "cpu", preferred_dtypes("cpu")[0])
    target.mkdir(parents=True)
    (target / MANIFEST).write_text("{}")
    found, _ = find_artifact(LoadOptions(model=str(tmp_path), device="cpu"))
    assert found == target


def test_float32_replies_identical_across_backends_on_a_chat_prompt(tiny_llama, tmp_path):
    artifact = export(str(tiny_llama), tmp_path / "art", max_len=128)
    ts = TorchScriptBackend(artifact)
    hf = TransformersBackend(LoadOptions(model=str(tiny_llama), device="cpu", dtype="float32"))
    messages = [{"role": "user", "content": "Hello, how are you today?"}]
    ids = ts.tokenizer.encode(ts.tokenizer.render(messages), add_special_tokens=False)
    assert ids == hf.tokenizer.encode(hf.tokenizer.render(messages), add_special_tokens=False)
    params = GenerationParams(temperature=0.0, max_new_tokens=40, min_new_tokens=40)
    replies = []
    for backend in (ts, hf):
        stream = ReplyStream(backend, ids, params, torch.Generator())
        replies.append("".join(stream))
    assert replies[0] == replies[1]


@pytest.mark.slow
def test_bench_runs_both_backends(tiny_llama, tmp_path):
    """tools/bench.py end to end on the tiny model (speeds are reported, never asserted)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    done = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "bench.py"),
            f"--model={model}",
            "--device=cpu",
            "--dtypes=float32",
            "--prompts=8",
            "--new-tokens=4",
            "--repeats=1",
            f"--out={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "bench.json").read_text())
    run = results["runs"][0]
    assert run["torchscript"]["backend"] == "torchscript" and run["transformers"]["backend"] == "transformers"
    assert run["floor_tok_s"] > 0 and "| float32 | 8 | torchscript |" in done.stdout


def test_bench_re_exports_an_artifact_older_than_the_exporter(tmp_path):
    import importlib.util
    import os
    import time

    spec = importlib.util.spec_from_file_location("bench", TOOLS / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (tmp_path / MANIFEST).write_text("{}")
    os.utime(tmp_path / MANIFEST, (0, 0))  # written before chat/export/*.py was last changed
    assert bench.older_than_exporter(tmp_path)
    later = time.time() + 3600
    os.utime(tmp_path / MANIFEST, (later, later))
    assert not bench.older_than_exporter(tmp_path)


def test_bench_peak_memory_is_the_workers_own():
    """Workers start after the parent may have exported (GBs); their peak must not include the parent's."""
    parent = bytearray(400 * 2**20)  # 400 MiB, touched
    code = f"import sys; sys.path.insert(0, {str(TOOLS)!r}); import bench; print(bench.peak_rss_mib())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(done.stdout) < 300 and len(parent) > 0


def test_profile_decode_reports_ops_per_step(tiny_llama, tmp_path):
    """tools/profile_decode.py, the tool that says where a decode step goes, runs on an artifact."""
    artifact = export(str(tiny_llama), tmp_path / "ts", max_len=64)
    done = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "profile_decode.py"),
            str(artifact),
            "--context=9",
            "--steps=3",
            "--rows=1000",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    attention = "chat::cache_attend" if native.supported() is None else "aten::scaled_dot_product_attention"
    assert attention in done.stdout
    assert "9 cached tokens, 3 steps" in done.stdout and "op calls" in done.stdout


def test_quantize_quality_script_compares_the_rounded_models(tiny_llama):
    """tools/quantize_quality.py, which measures what int8 and int4 rounding cost a model, runs and reports each."""
    done = subprocess.run(
        [sys.executable, str(TOOLS / "quantize_quality.py"), f"--model={tiny_llama}", "--tokens=5"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    names = ["original", "int8", "int4", "bfloat16"]
    assert [line.split()[0] for line in lines[1:5]] == names and "perplexity" in lines[2]
    assert lines[5].startswith("greedy tokens that agree with the original's") and len(lines[6].split()) >= 4
    assert lines[11].startswith("greedy replies to") and [line.split()[0] for line in lines[12:]] == names


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_cuda_forms_give_transformers_logits_on_cpu(request, model):
    """The module as exported for CUDA (fused norms, RoPE by cat, decode over a masked cache bucket), traced
    and run on the CPU: GPU machines are rare, so its arithmetic is checked on every test run."""
    from transformers import AutoModelForCausalLM

    from chat.export import trace
    from chat.export.families import convert
    from chat.lean.model import Forms, build

    hf = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(model), dtype=torch.float32).eval()
    shape, top, layers, ropes = convert(hf, 64)
    lean = build(shape, top, layers, ropes, Forms(cuda=True), torch.float32).eval()
    module = trace(lean, torch.float32, torch.device("cpu"))
    ids, positions = list(range(5, 16)), torch.arange(64)
    with torch.no_grad():
        expected = hf(torch.tensor([[*ids, 7]])).logits[0]
        prefill = module.prefill(torch.tensor(ids), positions[:11], positions[:11])
        # Slots 12..31 of the bucket hold what tracing left there: the mask must keep them out.
        decode = module.decode(torch.tensor([7]), positions[11:12], positions[:32])
    assert torch.allclose(prefill, expected[10], atol=1e-4)
    assert torch.allclose(decode, expected[11], atol=1e-4)


def test_longrope_context_stops_where_its_factors_change():
    """Phi-3.5's longrope switches every position to its long factors past original_max_position_embeddings,
    which a table cannot follow: the context stops there, and a longer --max-len is refused in one line."""
    from transformers import Phi3Config

    from chat.export.families import context_limit

    factors = {"short_factor": [1.0] * 8, "long_factor": [4.0] * 8}
    config = Phi3Config(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=256,
        original_max_position_embeddings=64,
        rope_scaling={"rope_type": "longrope", **factors},
    )
    assert context_limit(config, None) == 64 and context_limit(config, 48) == 48
    with pytest.raises(ChatError, match=r"\(64 with its longrope RoPE, whose factors change past 64 tokens\)"):
        context_limit(config, 128)
    plain = Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=256)
    assert context_limit(plain, None) == 256
