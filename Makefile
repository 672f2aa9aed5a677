# stylecast: `make test` and `make serve` work on a fresh clone (network: package registries only).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch/torchvision are pinned as a matching pair (torchvision's C++ ops only load with the exact torch
# they were built against). This is the CUDA build from PyPI; it runs on CPU-only machines too.
TORCH_SPEC ?= torch==2.14.0 torchvision==0.29.0
STAMP  := $(VENV)/.stylecast-installed
PYTEST_ARGS ?=

.PHONY: all install test test-gpu test-slow serve demo protos plugins plugins-torch bench bench-gpu device-check clean \
	install-server dist images test-deploy

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip >/dev/null

$(STAMP): $(PY) pyproject.toml Makefile
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e ".[dev]"
	$(PY) -m protos.build
	touch $(STAMP)

install: $(STAMP)

protos: $(STAMP)
	$(PY) -m protos.build

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: install
	STYLECAST_RUN_SLOW=1 $(PY) -m pytest $(PYTEST_ARGS)

test-gpu: install
	STYLECAST_STRICT_OPS=1 $(PY) -m pytest -m gpu $(PYTEST_ARGS)

DEMO_DIR ?= demo/models
SERVE_ARGS ?=

demo: install
	$(PY) -m export.demo --out $(DEMO_DIR)/demo

serve: demo
	$(VENV)/bin/stylecast serve --models $(DEMO_DIR) $(SERVE_ARGS)

# Server-only (torch-free) venv, exactly as the container images install it.
SERVER_VENV ?= build/server-venv
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

install-server:
	sh deploy/install.sh --venv $(SERVER_VENV) --python $(PYTHON)

# Wheel + sdist (the build hook compiles protos/ with the pinned grpcio-tools).
dist: install
	$(PY) -m build --outdir dist .

images:
	docker build -f deploy/Dockerfile.cpu -t stylecast-serve:$(VERSION)-cpu .
	docker build -f deploy/Dockerfile.cuda -t stylecast-serve:$(VERSION)-cuda .

test-deploy: install
	$(PY) -m pytest tests/deploy $(PYTEST_ARGS)

plugins: install
	$(PY) -m trt_plugins.build

plugins-torch: install
	$(PY) -m trt_plugins.build --torch-ext

bench: install
	$(PY) -m stylecast bench backends --quick
	$(PY) -m stylecast bench server --quick

bench-gpu: install
	STYLECAST_STRICT_OPS=1 $(PY) -m stylecast bench backends --sizes 256,512,1024 --batches 1,2,4,8,16,32 --backends all
	$(PY) -m stylecast bench server --model config-f --size 1024 --concurrency 1,2,4,8,16,32,64 --duration 30 --max-batch 16

# The GPU device check (README: "GPU device check"): no install step, the machine's own python3 runs it from the
# source tree, so it works on a bare GPU machine without network.
DEVICE_OUT ?= out/device-check
DEVICE_ARGS ?=

device-check:
	$(PYTHON) -m benchmarks.device --out $(DEVICE_OUT) $(DEVICE_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache trt_plugins/build
	find . -name __pycache__ -prune -exec rm -rf {} +
