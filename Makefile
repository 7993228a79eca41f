# Every install step lives here: a fresh clone needs only python3 and the package registries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch goes in first, pinned (requirements/torch.txt): 2.13.0 is a CPU build on our machines; an open
# range would pull a multi-GB CUDA build.
DEMO := models/smollm2-135m-instruct
DEMO_STAMP := $(DEMO)/.complete
# The GGUF file the demo model is converted from, kept beside it: `chat $(DEMO_GGUF)` runs it too.
DEMO_GGUF := models/SmolLM2-135M-Instruct.Q4_1.gguf
# The demo model exported for this CPU: bfloat16 is the fastest here (see docs/performance.md).
DEMO_ARTIFACT := $(DEMO)/torchscript/cpu-bfloat16

.PHONY: help venv native demo demo-model demo-artifact test serve llama-server test-torch-next lint format bench bundle bundle-test image-test clean llama-cpp bench-peers

help:
	@echo "make demo    install into .venv, fetch the demo model and chat with it"
	@echo "make test    install what the tests need and run them"
	@echo "make test-torch-next  the backend, export, native and session tests on torch $(NEXT_TORCH) (not in CI)"
	@echo "make lint    ruff and hadolint"
	@echo "make bench   TorchScript vs transformers on the demo model"
	@echo "make bench-peers  TorchScript vs llama.cpp on the demo model (make llama-cpp: build llama.cpp once)"
	@echo "make bundle  standalone executables in dist/ (make bundle-test: CI's smoke test)"
	@echo "make image-test  build both Docker images and check them on the demo model (docker, else podman)"

venv: $(VENV)/.installed

# The pins in requirements/ are the ones the Docker images install: tests run what ships.
$(VENV)/.installed: pyproject.toml requirements/torch.txt requirements/runtime.txt requirements/dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/torch.txt
	$(BIN)/python -m pip install -q -r requirements/dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# chat's native CPU kernels (chat/native): compiled once per torch and source into chat/native/lib (else
# ~/.cache/chat/native; about 10 s of g++), as a chat would on first use; without them the same ops run on
# torch's own kernels, slower.
native: $(VENV)/.installed
	$(BIN)/python -m chat.native

demo-model: $(DEMO_STAMP) $(DEMO_GGUF)

$(DEMO_STAMP): $(VENV)/.installed
	$(BIN)/python scripts/fetch_demo_model.py --dest=$(DEMO)

# The same script keeps the GGUF file, also where the model directory was fetched before it did (order-only:
# the file is older than the stamp).
$(DEMO_GGUF): | $(DEMO_STAMP)
	$(BIN)/python scripts/fetch_demo_model.py --dest=$(DEMO)

demo-artifact: $(DEMO_ARTIFACT)/chat-artifact.json

# Re-exported when the exporter or the native kernels change, so a pulled speed-up reaches the demo (export
# builds the kernels when they are missing).
$(DEMO_ARTIFACT)/chat-artifact.json: $(DEMO_STAMP) $(wildcard chat/export/*.py chat/lean/*.py) $(wildcard chat/native/*.cpp chat/native/*.h)
	$(BIN)/python -m chat.export $(DEMO) $(DEMO_ARTIFACT) --dtype=bfloat16

# With a terminal, open the chat; without one (CI, a pipe), answer one question instead of waiting.
demo: demo-model demo-artifact
	@if [ -t 0 ]; then $(BIN)/chat $(DEMO); \
	else $(BIN)/chat $(DEMO) --temperature 0 --prompt "What is the capital of France?"; \
	echo "(no terminal: run .venv/bin/chat to chat)"; fi

# The remote-engine tests start real servers: transformers serve (requirements/serve.txt, into .venv) and
# llama-server (make llama-cpp); CHAT_REQUIRE_SERVERS=1 makes a missing one fail rather than skip.
test: demo-model demo-artifact native serve llama-cpp
	HF_HUB_OFFLINE=1 CHAT_REQUIRE_SERVERS=1 $(BIN)/python -m pytest -q

serve: $(VENV)/.serve-installed

$(VENV)/.serve-installed: $(VENV)/.installed requirements/serve.txt
	$(BIN)/python -m pip install -q -r requirements/serve.txt
	touch $@

# The next torch, before requirements/torch.txt moves to it: a second venv (PyPI's build, several GB), its own
# native kernels, and the tests of what touches torch. PIP_CONSTRAINT=/dev/null: a site-wide pip constraint
# capping torch (our machines have one) would refuse the pin.
NEXT_TORCH := 2.15.0
NEXT := .venv-torch-2.15
NEXT_TESTS := tests/test_torchscript_backend.py tests/test_export.py tests/test_native.py tests/test_session.py \
	tests/test_select.py

$(NEXT)/.installed: pyproject.toml requirements/runtime.txt requirements/dev.txt
	test -x $(NEXT)/bin/python || $(PYTHON) -m venv $(NEXT)
	$(NEXT)/bin/python -m pip install -q --upgrade pip
	PIP_CONSTRAINT=/dev/null $(NEXT)/bin/python -m pip install -q torch==$(NEXT_TORCH) -r requirements/dev.txt
	$(NEXT)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-torch-next: $(NEXT)/.installed demo-model demo-artifact
	$(NEXT)/bin/python -m chat.native
	HF_HUB_OFFLINE=1 $(NEXT)/bin/python -m pytest -q $(NEXT_TESTS)

lint: venv
	$(BIN)/ruff check chat scripts tests packaging tools
	$(BIN)/ruff format --check chat scripts tests packaging tools
	$(BIN)/hadolint --failure-threshold warning Dockerfile Dockerfile.cuda

format: venv
	$(BIN)/ruff format chat scripts tests packaging tools
	$(BIN)/ruff check --fix chat scripts tests packaging tools

bench: demo-model
	$(BIN)/python tools/bench.py --model=$(DEMO)

bundle: demo-artifact
	$(BIN)/python packaging/build_bundle.py --model=$(DEMO_ARTIFACT)

bundle-test: demo-artifact
	$(BIN)/python packaging/bundle_smoke.py --model=$(DEMO_ARTIFACT)

# docker when a daemon answers, else podman and buildah (installed from Debian's packages when missing).
image-test: demo-artifact
	$(BIN)/python tools/image_test.py

clean:
	rm -rf $(VENV) $(NEXT) build dist .pytest_cache .ruff_cache

# llama.cpp from the llama-cpp-python sdist, built once (~7 min on 2 idle cores) into ~/.cache/chat/llama.cpp
# ($CHAT_LLAMA_CPP_DIR overrides) and reused after; prints where llama-bench, llama-quantize, llama-server are.
# The speed peer of make bench-peers, and a real server for the remote-engine tests.
llama-cpp: $(VENV)/.installed
	$(BIN)/python tools/llama_cpp.py

llama-server: llama-cpp

# Alternated rounds against llama.cpp (BF16, Q8_0, F32, one thread); ROUNDS and MINUTES for more rounds.
ROUNDS ?= 3
MINUTES ?= 0
bench-peers: demo-model llama-cpp
	$(BIN)/python tools/bench_peers.py --model=$(DEMO) --rounds=$(ROUNDS) --minutes=$(MINUTES)
