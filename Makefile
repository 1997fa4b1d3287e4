# capbench: `make demo` installs everything and runs the main job; `make test` installs and tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all test-fast lint clean gpu-bundle docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/capbench run --config demo
	$(BIN)/capbench baseline --dataset shapes --encoder resnet50 --no-pretrained
	$(BIN)/capbench report
	@echo
	@echo "Next (README: Everyday use; activate with: source $(VENV)/bin/activate):"
	@echo "  capbench report --wide                        every column of the leaderboard"
	@echo "  capbench compare RUN_A RUN_B                  paired bootstrap test of two runs"
	@echo "  capbench run --config demo --arch transformer another decoder on the same split"
	@echo "  capbench matrix --config matrix-shapes --no-pretrained   every decoder x encoder"
	@echo "  capbench eval PREDS.json --references coco-val2014        score captions from anywhere"
	@echo "  capbench bench decoders all                   decoder throughput"
	@echo "  capbench doctor                               what works on this machine"

# CI (.ci/run) = make test. It leaves out the 5 tests marked long (DDP equal to one process,
# twice; a kill mid-epoch resuming exactly; gpu-table's failing step; the CLI on coco-mini), which make test-all runs:
# CI must stay under 20 minutes. --durations: the CI log names its slowest tests
test: $(STAMP)
	$(BIN)/ruff check architectures benchmark tests docs/hooks
	$(BIN)/python -m pytest -q --durations=25 -m "not long"
	$(BIN)/capbench check --baseline results/baselines/tiny.json

# everything, the long tests too (about 7 minutes more)
test-all: $(STAMP)
	$(BIN)/ruff check architectures benchmark tests docs/hooks
	$(BIN)/python -m pytest -q --durations=25
	$(BIN)/capbench check --baseline results/baselines/tiny.json

# the tests not marked slow (no end-to-end training runs): a quick loop while editing
test-fast: $(STAMP)
	$(BIN)/ruff check architectures benchmark tests docs/hooks
	$(BIN)/python -m pytest -q -m "not slow and not long"

# For a GPU machine without network that has its own PyTorch, timm and transformers (docs/gpu.md:
# "Measuring a GPU"): the pure-Python packages it lacks, copied from this venv without the
# Java jars and METEOR's 59 MiB paraphrase table (METEOR and SPICE report themselves
# unavailable there; BLEU, ROUGE-L and CIDEr-D run), and flickr8k-mini. About 37 MB in .gpu/.
GPU_PKGS := open_clip ftfy wcwidth platformdirs pycocoevalcap
GPU_DATA ?= ../shared/data/flickr8k-mini
gpu-bundle: $(STAMP)
	rm -rf .gpu && mkdir -p .gpu/site .gpu/data
	cd "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" && \
	  tar cf - --exclude='*.jar' --exclude='paraphrase-*' --exclude='__pycache__' $(GPU_PKGS) \
	    open_clip_torch-*.dist-info ftfy-*.dist-info wcwidth-*.dist-info \
	    platformdirs-*.dist-info pycocoevalcap-*.dist-info | tar xf - -C "$(CURDIR)/.gpu/site"
	cp -r $(GPU_DATA) .gpu/data/
	du -sh .gpu

# the documentation site (docs/, mkdocs.yml) into site/; --strict: any warning fails it (the
# tests build it the same way). Read it served: python3 -m http.server -d site (search needs
# a server), or $(BIN)/mkdocs serve while editing
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check architectures benchmark tests docs/hooks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
