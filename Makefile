# The two set-up commands of the README. Each creates .venv when missing and installs everything it needs.
# torch goes in first and pinned: `pip install torch==2.13.0` takes the machine's CPU wheel, where an unpinned
# dependency would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
TORCH_VERSION ?= 2.13.0
DEMO_MODEL := .cache/demo-model
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1

.PHONY: run test lint typecheck unit bench clean proto

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==$(TORCH_VERSION)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

$(DEMO_MODEL)/config.json: | $(STAMP)
	$(VENV)/bin/splitserve make-tiny-model $(DEMO_MODEL) --arch llama --layers 4 --hidden 256 --heads 8 --kv-heads 2 --vocab 2048

# Until the cluster lands (`splitserve up`), `make run` streams a generation from the demo model on one engine.
run: $(STAMP) $(DEMO_MODEL)/config.json
	$(VENV)/bin/splitserve generate --model $(DEMO_MODEL) --prompt "$${PROMPT:-The cluster splits every request into}" --max-tokens 48 --temperature 0.8 --seed 1

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: lint typecheck
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/engine_throughput.py

# Regenerate the committed protobuf/gRPC modules after editing proto/splitserve/v1/*.proto.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --grpc_python_out=proto --pyi_out=proto proto/splitserve/v1/*.proto

clean:
	rm -rf $(VENV) .cache
