# Two commands on a fresh machine: `make bench` (the main job) and `make test`.
# Both create .venv and install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PINS := torch==2.14.1 torchaudio==2.11.0
SOURCES := $(wildcard csrc/*.cpp csrc/*.h) setup.py pyproject.toml

.PHONY: install test bench espeak recipe clean gpu-check

# Re-run when the Makefile (its package list) changes, so an existing .venv gets new packages.
$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_PINS) ninja numpy tqdm soundfile jiwer matplotlib flashlight-text pytest pytest-benchmark hypothesis onnx onnxruntime onnxscript
	touch $@

# The C++ extension is rebuilt whenever csrc/ or the build files change.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

# espeak-ng synthesises the speech corpus (Debian package; root here and in CI).
espeak:
	@command -v espeak-ng >/dev/null || { apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null; }

test: install espeak
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m dynenc bench

# On a CUDA machine: every GPU-marked test, then the bench on the GPU; results in out/gpu/.
# Without a GPU it says so and succeeds.
GPU_OUT := out/gpu
gpu-check: install
	@if ! $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		echo "gpu-check: no GPU present (torch.cuda.is_available() is False); nothing to check"; exit 0; fi; \
	mkdir -p $(GPU_OUT) && \
	$(PY) -m pytest -q -m gpu tests --junitxml=$(GPU_OUT)/pytest.xml && \
	$(PY) -m dynenc bench --devices cuda --no-progress --out $(GPU_OUT)

# The speech recipe of docs/results.md: corpus, static teacher, every other registered
# method (`python -m dynenc.methods` lists them) fine-tuned from it, then the budget sweep.
DATA ?= data/speech
FINETUNE := --epochs 5 --lr 1e-3 --warmup 0.2 --init runs/static/model.pt --teacher runs/static/model.pt
recipe: install espeak
	$(PY) -m dynenc data --out-dir $(DATA)
	$(PY) -m dynenc train --method static --data $(DATA) --epochs 16
	methods=$$($(PY) -m dynenc.methods) || exit 1; \
	for method in $$methods; do [ $$method = static ] && continue; \
		$(PY) -m dynenc train --method $$method --data $(DATA) $(FINETUNE) || exit 1; done
	$(PY) -m dynenc eval --data $(DATA) --runs runs --out docs/results

clean:
	rm -rf build *.egg-info dynenc/_C*.so
