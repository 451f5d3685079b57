# The synthetic-speech recipe's targets, included by the top-level Makefile (run from the
# repository root: `make recipe`, `make recipe-v2`, `make recipe-bpe256`).
RECIPE := recipes/synthetic_speech
RECIPE_RUN := $(PY) -m recipes.synthetic_speech run
RESULTS := $(RECIPE)/results

.PHONY: speech-engines kenlm recipe recipe-v2 recipe-bpe256

# The engines that synthesise the speech corpus (Debian packages; root here and in CI).
SPEECH_PACKAGES := espeak-ng flite festival festvox-kallpc16k festvox-us-slt-hts
speech-engines:
	@for exe in espeak-ng flite festival text2wave; do command -v $$exe >/dev/null || missing=1; done; \
	[ -z "$$missing" ] || { apt-get update -qq && apt-get install -y -qq $(SPEECH_PACKAGES) >/dev/null; }

# KenLM's lmplz, which estimates the recipe's word n-gram LM ($(RECIPE)/language_model.py):
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

# The reproduction of $(RESULTS)/v3/results.md: the multi-engine corpus and its units, every
# protocol for seeds 0-2, the report. Resumable: finished runs are skipped.
SEEDS ?= 0 1 2
recipe: install speech-engines kenlm
	$(RECIPE_RUN) --seeds $(SEEDS)

# The earlier plan v2 (half the training speech, 12 scratch epochs), kept reproducible beside
# the current one: its own corpus, runs and report.
recipe-v2: install speech-engines kenlm
	$(RECIPE_RUN) --seeds $(SEEDS) --plan $(RESULTS)/v2/plan.json --data data/speech-v2 \
		--runs runs/recipe-v2 --results $(RESULTS)/v2/results.json --report $(RESULTS)/v2/results.md

# Blank skipping nearer its regime: plan v3 with 256 BPE units (fewer tokens per frame, so more
# blank frames than bpe64 leaves), only the static start and blank skip. A corpus directory
# holds one set of units: data/speech-bpe256 is data/speech's corpus (same seed, same audio).
recipe-bpe256: install speech-engines kenlm
	$(RECIPE_RUN) --seeds $(SEEDS) --protocols static blank_skip --plan $(RESULTS)/bpe256/plan.json \
		--data data/speech-bpe256 --runs runs/recipe-bpe256 --results $(RESULTS)/bpe256/results.json \
		--report $(RESULTS)/bpe256/results.md
