# One command each: `make test` (set up + tests), `make train` (set up + the default run), `make lint`.
# Creates or reuses a virtual environment in .venv with the CPU build of torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
STAMP := $(VENV)/.installed
# crossmae._C is rebuilt (incrementally, in build/) when its CMake sources change
EXT_SOURCES := CMakeLists.txt $(shell find kernels/csrc -type f 2>/dev/null)

.PHONY: venv test train lint clean

# torch first, then crossmae without build isolation: its extension builds against this torch
$(STAMP): setup.py pyproject.toml Makefile $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" "$(TRITON_SPEC)" "setuptools>=70.1" "cmake>=3.21"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

train: $(STAMP)
	$(PY) train.py --fused

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
