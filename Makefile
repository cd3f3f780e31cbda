# The two commands a new user runs: `make setup` then `make test`.
PY ?= python3
VENV ?= .venv
# The PyTorch build to install. The default pins 2.13.0: on the project machines pip takes the CPU wheel
# that lies on disk; elsewhere pip takes PyPI's default build (CUDA on Linux). For another build, pass the
# pip arguments of your choice, e.g. `make setup TORCH="torch==2.13.0 --index-url <your PyTorch index>"`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# lmms-eval for its test (tests/test_lmms_eval.py): without its declared dependencies, which would replace
# the CPU torch with a CUDA build (through torchvision) and add ~70 packages for other models' tasks; these
# are what its CLI imports for a generate_until task (filelock < 4: it imports filelock._api), plus openai
# for its OpenAI-compatible model (pointed at `gpt2mm serve`).
LMMS_EVAL ?= lmms-eval==0.7.3
LMMS_EVAL_NEEDS ?= loguru sacrebleu evaluate pytz tenacity pytablewriter "filelock<4" openai python-dotenv

.PHONY: setup setup-browser test test-all lint format demo bench clean

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps $(LMMS_EVAL)
	$(BIN)/pip install $(LMMS_EVAL_NEEDS)

# Debian's Chromium for the web-page tests (driven by Playwright; they are skipped without it). Needs root.
# Then, from npm, the three files of onnxruntime-web the exported ONNX page loads (its test is skipped
# without them; a failure here does not stop the setup).
# the version src/gpt2mm/onnx_web/index.html loads
ORT_WEB_VERSION := 1.31.1
ORT_WEB := $(HOME)/.cache/gpt2mm/onnxruntime-web-$(ORT_WEB_VERSION)
setup-browser:
	apt-get update
	apt-get install -y --no-install-recommends chromium
	-[ -f $(ORT_WEB)/ort.wasm.min.js ] || (tmp=$$(mktemp -d) && cd $$tmp \
	  && npm pack --silent onnxruntime-web@$(ORT_WEB_VERSION) && tar xzf onnxruntime-web-$(ORT_WEB_VERSION).tgz \
	  && mkdir -p $(ORT_WEB) && cd package/dist \
	  && cp ort.wasm.min.js ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm $(ORT_WEB)/; rm -rf $$tmp)

test:
	$(BIN)/python -m pytest

demo:
	$(BIN)/gpt2mm demo --out demo-out --overwrite

bench:
	$(BIN)/python bench/train_throughput.py --preset tiny --device cpu

test-all:
	$(BIN)/python -m pytest -m "slow or not slow"

lint:
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format:
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
