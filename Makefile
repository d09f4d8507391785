# convray developer entry points. `make serve` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch for dev and CI, from PyTorch's CPU index (PyPI's Linux torch is the multi-GB CUDA build);
# pyproject keeps a range so GPU users get CUDA builds. For one: TORCH=torch==2.13.0 TORCH_INDEX=<PyTorch's CUDA index>.
TORCH  ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PROTOS := $(wildcard proto/convray/*/*.proto)
STUBS  := $(PROTOS:.proto=_pb2.py)

# tritonclient pins protobuf < 7, so the OIP tests drive it from its own venv, as an external client would.
CLIENT_VENV := .venv-tritonclient
TRITONCLIENT ?= tritonclient[grpc,http]==2.73.0

.PHONY: install proto serve test lint bench bench-gpu train-default clean

install: $(VENV)/.installed $(STUBS)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch alone from TORCH_INDEX, then its dependencies from the usual indexes: asking TORCH_INDEX for each of
	# them costs a retry cycle apiece where it cannot be reached (offline CI with the wheel on disk).
	$(PY) -m pip install --quiet --no-deps '$(TORCH)' --extra-index-url $(TORCH_INDEX)
	$(PY) -m pip install --quiet '$(TORCH)'
	$(PY) -m pip install --quiet -e '.[dev,train]'
	touch $@

# The one step that builds gRPC stubs from proto/ (also run by `make install`).
proto: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto $(PROTOS)

proto/convray/%_pb2.py: proto/convray/%.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto $<

serve: install
	$(VENV)/bin/convray serve

$(CLIENT_VENV)/.installed: Makefile
	test -x $(CLIENT_VENV)/bin/python || $(PYTHON) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/python -m pip install --quiet '$(TRITONCLIENT)' pillow
	touch $@

test: install $(CLIENT_VENV)/.installed
	$(VENV)/bin/ruff check service workers tests scripts examples deploy
	$(VENV)/bin/python -m pytest

lint: install
	$(VENV)/bin/ruff check service workers tests scripts examples deploy

# Side-by-side benchmark (raw model, no-op gRPC floor, Ray Serve, convray); about 9 minutes.
bench: install
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) tests/bench/run.py --out docs/benchmark-results.json

# The same on a GPU machine: each server's replica and the raw model on the GPU, plus convray with bf16.
# Four client processes per c=32 point: one saturated against the no-op server on a 16-core H200 node.
# Needs a CUDA build of torch in a fresh .venv: make bench-gpu TORCH=torch==2.13.0 TORCH_INDEX=<PyTorch's CUDA wheel index>
bench-gpu: install
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) tests/bench/run.py --gpus 1 --targets noop,ray_serve,convray,convray_bf16 --variants-on resnet_style \
		--client-processes 4 --out docs/benchmark-results-gpu.json

# Reproduces the shipped default model (models/digits/1) from scikit-learn's digits,
# published as the next version of `digits` in ./models.
train-default: install
	$(VENV)/bin/convray train --workers 0 --dataset digits --preset digits-small --epochs 30 --seed 0 \
		--model-repo models --model-name digits

clean:
	rm -rf $(VENV) $(CLIENT_VENV) proto/convray/*/*_pb2*.py proto/convray/*/*_pb2*.pyi
