# `make test` works from a fresh clone: it creates (or reuses) .venv, installs the project
# with its test extra and runs pytest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only when the venv has no torch yet. The default is the CPU wheel this
# project's CI machines hold on disk; with a CUDA torch already in the venv nothing is
# replaced (pyproject asks for a range). Override: make TORCH_SPEC='torch==2.5.1' test
TORCH_SPEC ?= torch==2.13.0

.PHONY: install protos test deploy-check bench tiny run clean

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed protos

# sdxl.v1's Python code, generated in place beside the .proto files (gitignored, never edited).
# The install generates it too, with the build's grpcio-tools; this uses the venv's, which matches
# the venv's grpcio and protobuf (generated code refuses a runtime older than its generator).
protos: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos --pyi_out=protos \
		protos/sdxl/v1/*.proto

# The whole suite; it includes the deploy checks (tests/deploy is under testpaths), so they run once.
test: install
	$(PY) -m pytest -q

# The deploy checks alone: manifests rendered with `kubectl kustomize` and checked against the code and
# offline Kubernetes schemas, hadolint on the Dockerfile, its install step, the weights Job's fetch.
deploy-check: install
	$(PY) -m pytest -q tests/deploy tests/core/test_fetch.py

bench: install
	$(PY) -m bench.core_vs_diffusers && $(PY) -m bench.transport && $(PY) -m bench.engine && $(PY) -m bench.faults && $(PY) -m bench.lora

tiny: install
	$(PY) -m sdxl_core.tiny .cache/tiny-sdxl

# Five stage processes on the tiny model, one image with the ensemble refiner (out.png), then stop.
run: install
	$(PY) -m sdxl_client demo -o out.png

clean:
	rm -rf $(VENV) .cache .pytest_cache
