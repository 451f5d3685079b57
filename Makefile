# Two commands on a fresh machine: `make bench` (the main job) and `make test`.
# Both create .venv and install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PINS := torch==2.14.1 torchaudio==2.11.0
SOURCES := $(wildcard csrc/*.cpp csrc/*.h) setup.py pyproject.toml

.PHONY: install test bench speech-engines kenlm recipe recipe-v2 recipe-bpe256 clean gpu-check

# Re-run when the Makefile (its package list) changes, so an existing .venv gets new packages.
$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_PINS) ninja numpy tqdm soundfile jiwer matplotlib flashlight-text sentencepiece pytest pytest-benchmark hypothesis onnx onnxruntime onnxscript
	touch $@

# The C++ extension is rebuilt whenever csrc/ or the build files change.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

# The engines that synthesise the speech corpus (Debian packages; root here and in CI).
SPEECH_PACKAGES := espeak-ng flite festival festvox-kallpc16k festvox-us-slt-hts
speech-engines:
	@for exe in espeak-ng flite festival text2wave; do command -v $$exe >/dev/null || missing=1; done; \
	[ -z "$$missing" ] || { apt-get update -qq && apt-get install -y -qq $(SPEECH_PACKAGES) >/dev/null; }

# KenLM's lmplz, which estimates the recipe's word n-gram LM (dynenc/recipe/language_model.py):
# built from the kenlm source package into the venv; the build needs cmake and Boost (Debian).
KENLM_PACKAGES := cmake libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev
LMPLZ := $(VENV)/bin/lmplz
$(LMPLZ): | $(VENV)/.deps
	@dpkg -s $(KENLM_PACKAGES) >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $(KENLM_PACKAGES) >/dev/null; }
	@echo "building KenLM's lmplz into $@"; set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PIP) download -q --no-deps kenlm==0.3.0 -d "$$tmp"; tar xzf "$$tmp"/kenlm-0.3.0.tar.gz -C "$$tmp"; \
	{ cmake -S "$$tmp"/kenlm-0.3.0 -B "$$tmp"/build -DCMAKE_BUILD_TYPE=Release && \
	  $(MAKE) -C "$$tmp"/build -j2 lmplz; } >"$$tmp"/build.log 2>&1 || { tail -30 "$$tmp"/build.log; exit 1; }; \
	cp "$$tmp"/build/bin/lmplz $@
kenlm: $(LMPLZ)

test: install speech-engines kenlm
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

# The reproduction of docs/results.md (`dynenc recipe`): the multi-engine corpus and its
# units, every protocol for seeds 0-2, the report. Resumable: finished runs are skipped.
SEEDS ?= 0 1 2
recipe: install speech-engines kenlm
	$(PY) -m dynenc recipe --seeds $(SEEDS)

# The earlier plan v2 behind docs/results-v2.md (half the training speech, 12 scratch epochs),
# kept reproducible beside the current one: its own corpus, runs and report.
recipe-v2: install speech-engines kenlm
	$(PY) -m dynenc recipe --seeds $(SEEDS) --plan docs/results-v2/plan.json --data data/speech-v2 \
		--runs runs/recipe-v2 --results docs/results-v2/results.json --report docs/results-v2.md

# Blank skipping nearer its regime: plan v3 with 256 BPE units (fewer tokens per frame, so more
# blank frames than bpe64 leaves), only the static start and blank skip. A corpus directory
# holds one set of units: data/speech-bpe256 is data/speech's corpus (same seed, same audio).
recipe-bpe256: install speech-engines kenlm
	$(PY) -m dynenc recipe --seeds $(SEEDS) --protocols static blank_skip --plan docs/results-bpe256/plan.json \
		--data data/speech-bpe256 --runs runs/recipe-bpe256 --results docs/results-bpe256/results.json \
		--report docs/results-bpe256.md

clean:
	rm -rf build *.egg-info dynenc/_C*.so
