# Two commands on a fresh machine: `make bench` (the main job) and `make test`.
# Both create .venv and install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, pinned (the build below compiles dynenc._C against it, without build isolation).
TORCH_PINS := torch==2.14.1 torchaudio==2.11.0
# What gets installed is listed once: pyproject.toml's extras (dynenc prepare/train/eval, export,
# the transformers encoders, the bench, the tests, the Triton kernels, the linters) and the
# recipe's own requirements.
EXTRAS := asr,export,hf,bench,test,cuda,dev
RECIPE_REQUIREMENTS := recipes/synthetic_speech/requirements.txt
SOURCES := $(wildcard csrc/*.cpp csrc/*.h) setup.py

.PHONY: install test bench clean gpu-check

# The packages: re-run when what lists them changes, so an existing .venv gets new ones.
$(VENV)/.deps: Makefile pyproject.toml $(RECIPE_REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_PINS) ninja
	touch $@

# dynenc itself (editable) with its extras: the C++ extension is rebuilt whenever csrc/ or the
# build files change; the extras' packages come with it.
$(VENV)/.built: $(VENV)/.deps $(SOURCES) pyproject.toml
	$(PIP) install -q --no-build-isolation -e '.[$(EXTRAS)]' -r $(RECIPE_REQUIREMENTS) $(TORCH_PINS)
	touch $@

install: $(VENV)/.built

test: install speech-engines kenlm
	$(PY) -m pytest -q tests recipes/synthetic_speech/tests

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
	$(PY) -m dynenc bench --full --devices cuda --no-progress --out $(GPU_OUT)

# The synthetic-speech recipe: speech-engines, kenlm, recipe, recipe-v2, recipe-bpe256.
include recipes/synthetic_speech/recipe.mk

clean:
	rm -rf build *.egg-info dynenc/_C*.so
