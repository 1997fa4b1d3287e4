# capbench: `make demo` installs everything and runs the main job; `make test` installs and tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

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
	@echo "  capbench bench --arch all                     decoder throughput"
	@echo "  capbench doctor                               what works on this machine"

test: $(STAMP)
	$(BIN)/ruff check architectures benchmark tests
	$(BIN)/python -m pytest -q
	$(BIN)/capbench check --baseline results/baselines/tiny.json

# the tests not marked slow (no end-to-end training runs): a quick loop while editing
test-fast: $(STAMP)
	$(BIN)/ruff check architectures benchmark tests
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check architectures benchmark tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
