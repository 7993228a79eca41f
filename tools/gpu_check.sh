#!/usr/bin/env bash
# One prepared GPU check: a model of the demo's shape with random weights (the real
# tokenizer and config, carried in .gpu/smol), exported on CUDA with --verify, the CUDA tests, and the
# side-by-side bench. Usage on a GPU machine, from the repository root: bash tools/gpu_check.sh [OUTDIR]
# Needs python3 with torch, transformers, tokenizers, safetensors, jinja2 and pytest; docopt-ng may come
# as a wheel in .whl/ (the GPU machines have no network). Prepare .gpu/smol (git-excluded, 3.4 MB) with:
#   mkdir -p .gpu/smol && cp models/smollm2-135m-instruct/{tokenizer.json,tokenizer_config.json,\
#   chat_template.jinja,config.json,generation_config.json} .gpu/smol/
# Steps run most needed first, so a run cut short by the device's time limit keeps what matters most.
set -uo pipefail
OUT=${1:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
step() { echo; echo "=== $* ($(date -u +%T))"; }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"

step "random-weight model of the SmolLM2-135M shape"
MODEL=/tmp/smol
python3 - "$MODEL" <<'EOF'
import shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
for f in Path(".gpu/smol").iterdir():
    shutil.copy(f, out / f.name)
torch.manual_seed(0)
config = AutoConfig.from_pretrained(out)
AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
print("saved", sorted(p.name for p in out.iterdir()))
EOF

step "CUDA tests (the backend's graphs, the cache growing under them, the new families' CUDA forms)"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_torchscript_backend.py tests/test_families.py -k "cuda" -rs 2>&1 | tail -40

step "export cuda bfloat16 --verify (near ties allowed, see docs/export.md)"
timeout 180 python3 -m chat.export "$MODEL" "$MODEL/torchscript/cuda-bfloat16" --device=cuda --dtype=bfloat16 --verify \
    || { echo "bf16 verify did not pass; exporting without it for the bench"; \
         python3 -m chat.export "$MODEL" "$MODEL/torchscript/cuda-bfloat16" --device=cuda --dtype=bfloat16; }

step "kernels of one decode step (bf16, 64 cached tokens; the work toward 1500 tok/s starts here)"
timeout 120 python3 tools/profile_decode.py "$MODEL/torchscript/cuda-bfloat16" --context=64 --rows=30

step "bench (both backends, bf16)"
timeout 300 python3 tools/bench.py --model="$MODEL" --device=cuda --dtypes=bfloat16 --repeats=2 --out="$OUT"

step "export cuda float32 --verify (tokens must be identical)"
timeout 180 python3 -m chat.export "$MODEL" /tmp/ts-f32 --device=cuda --dtype=float32 --max-len=1024 --verify

step "decode variants (TorchScript, bf16, 256 tokens after a 64-token prompt; and at a 3000-token context)"
timeout 180 python3 - "$MODEL/torchscript/cuda-bfloat16" <<'EOF'
import sys, time, torch
sys.path.insert(0, "tools")
from profile_decode import fresh_prompt, seconds_per_step
from chat.backends.torchscript_backend import TorchScriptBackend
for graphs in (True, False):
    t = time.perf_counter(); b = TorchScriptBackend(sys.argv[1], cuda_graphs=graphs); load = time.perf_counter() - t
    seconds_per_step(b, fresh_prompt(b, 64), 16)
    short, long = (1 / seconds_per_step(b, fresh_prompt(b, n), 256) for n in (64, 3000))
    print(f"cuda_graphs={graphs}: load {load:.1f}s, decode {short:.0f} tok/s at 64, {long:.0f} tok/s at 3000")
    b.close(); torch.cuda.empty_cache()
EOF

step "done"
