# The two commands: `make demo` and `make test`. Each creates .venv when missing and installs everything.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU build from local disk for CI and laptops. GPU sites: install your CUDA torch into .venv first
# (e.g. `.venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu128`); an installed torch is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-fast venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bsf demo --out demo_out

test: $(STAMP)
	$(VENV)/bin/pytest -q --durations=25

# the edit loop: every test but the end-to-end runs (simulator, POC, long training) marked slow
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow" --durations=10

clean:
	rm -rf demo_out .pytest_cache
