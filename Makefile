# One command each: `make test` (set up + tests), `make train` (set up + the default run), `make lint`,
# `make dist` (sdist + wheel in dist/), `make wheel-check` (the wheel installed in a fresh venv, checked).
# Creates or reuses a virtual environment in .venv with the CPU build of torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
STAMP := $(VENV)/.installed
DIST ?= dist
WHEEL_VENV ?= build/wheel-venv
# crossmae._C is rebuilt (incrementally, in build/) when its CMake sources change
EXT_SOURCES := CMakeLists.txt $(shell find kernels/csrc -type f 2>/dev/null)

.PHONY: venv test train lint dist wheel-check clean

# torch first, then crossmae without build isolation: its extension builds against this torch
$(STAMP): setup.py pyproject.toml Makefile $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" "$(TRITON_SPEC)" "setuptools>=77" "cmake>=3.21"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

train: $(STAMP)
	$(PY) train.py --fused

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# the sdist, then the wheel built from it (compiling the extension against .venv's torch)
dist: $(STAMP)
	rm -rf $(DIST)
	$(PY) -m build --no-isolation --outdir $(DIST) .

# as a user installs it: a fresh venv, torch first (the pinned build, so pip never resolves a bare
# `torch` to a CUDA build), then the wheel; checked from outside the source tree
wheel-check: dist
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(WHEEL_VENV)/bin/python -m pip install $(DIST)/crossmae-*.whl > $(WHEEL_VENV)/pip-wheel.log
	cd $(WHEEL_VENV) && bin/python $(CURDIR)/.ci/wheel_smoke.py pip-wheel.log

clean:
	rm -rf $(VENV) build $(DIST) *.egg-info
