# `make test` works from a fresh clone: it creates (or reuses) .venv, installs the project
# with its test extra and runs pytest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only when the venv has no torch yet. The default is the CPU wheel this
# project's CI machines hold on disk; with a CUDA torch already in the venv nothing is
# replaced (pyproject asks for a range). Override: make TORCH_SPEC='torch==2.5.1' test
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test bench tiny clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m bench.core_vs_diffusers

tiny: install
	$(PY) -m sdxl_core.tiny .cache/tiny-sdxl

clean:
	rm -rf $(VENV) .cache .pytest_cache
