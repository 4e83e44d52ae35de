# Developer and CI entry points. `make test` is the one command the README and .ci/run promise.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned and installed before the package: a bare `torch` requirement may resolve to a multi-GB CUDA build,
# while this exact version is found as a local CPU wheel through pip's configuration.
TORCH_SPEC ?= torch==2.13.0
# Extra pytest arguments, e.g. `make test-newest PYTEST_ARGS=tests/test_configuration.py`.
PYTEST_ARGS ?=
# pytest-xdist processes, one test file each at a time (module fixtures are built once), and one torch thread each:
# on 2 cores, two 2-thread processes slow each other several-fold. 0 runs the tests in one process.
PYTEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile
# pip constraints for the package install; `make test-oldest` pins the lowest versions pyproject.toml allows.
CONSTRAINTS ?=
OLDEST_VENV ?= .venv-oldest
OLDEST_CONSTRAINTS := .ci/oldest-versions.txt

# Stamps live inside the venv so that deleting .venv resets them too.
VENV_STAMP := $(VENV)/.moe-mtp-venv
INSTALL_STAMP := $(VENV)/.moe-mtp-installed

.PHONY: test test-newest test-oldest test-transformers lint bench clean distclean install quickstart

# The version matrix CI runs: the newest transformers/peft/accelerate, then the oldest that pyproject.toml allows.
test: test-newest test-oldest

# ruff, our suite, then transformers' own common model tests, in .venv (the newest releases when it is created).
test-newest: $(INSTALL_STAMP)
	$(VENV)/bin/ruff check .
	@# Formatting is advisory: report drift without failing the build.
	@$(VENV)/bin/ruff format --check . >/dev/null 2>&1 || echo "note: 'ruff format --check .' reports unformatted files"
	$(PYTEST) $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-transformers VENV=$(VENV) CONSTRAINTS=$(CONSTRAINTS)

# The same in .venv-oldest, with the lower bounds of pyproject.toml pinned (tests/test_packaging.py keeps them equal),
# less the tests marked e2e: they run our own scripts and Makefile targets (the quickstart, the examples, the README's
# commands), whose calls into transformers, PEFT and accelerate the other tests make too; here they would add about 5
# minutes (they take that much of the newest leg's 11-12). `make test-oldest OLDEST_PYTEST_ARGS=` runs them too.
OLDEST_PYTEST_ARGS ?= -m "not e2e"
test-oldest:
	$(MAKE) --no-print-directory test-newest VENV=$(OLDEST_VENV) CONSTRAINTS=$(OLDEST_CONSTRAINTS) \
		PYTEST_ARGS='$(OLDEST_PYTEST_ARGS) $(PYTEST_ARGS)'

# transformers' ModelTesterMixin, ConfigTester, TrainingTesterMixin and its tensor-, expert- and FSDP-parallel mixins
# (2 gloo CPU ranks), from the sdist of the installed release.
test-transformers: $(INSTALL_STAMP)
	$(PY) tests/transformers_common/prepare.py $(VENV)/transformers-tests
	MOE_MTP_TRANSFORMERS_TESTS=$(VENV)/transformers-tests RUN_TRAINING_TESTS=1 \
		$(PYTEST) tests/transformers_common

lint: $(INSTALL_STAMP)
	$(VENV)/bin/ruff check .

install: $(INSTALL_STAMP)

# A stamp rather than $(PY) as the target: a half-finished venv (torch install interrupted) must be redone.
$(VENV_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH_SPEC)
	touch $@

# Re-install only when the package metadata changed; code changes need nothing (editable install).
$(INSTALL_STAMP): pyproject.toml $(CONSTRAINTS) $(VENV_STAMP)
	$(PY) -m pip install -e '.[dev]' $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $@

# Runs every benchmarks/*.py script (files starting with `_` are helpers); stops at the first failure.
bench: $(INSTALL_STAMP)
	@set -e; found=0; \
	for script in benchmarks/[!_]*.py; do \
		[ -e "$$script" ] || continue; found=1; \
		echo "== $$script"; $(PY) "$$script"; \
	done; \
	[ $$found = 1 ] || echo "no benchmark scripts under benchmarks/ yet"

# --- quickstart -------------------------------------------------------------------------------------------------
# 1. writes a code corpus from this Python's own stdlib sources (moe_mtp.corpora; held-out files kept apart);
# 2. trains a small MoE+MTP code model on it from scratch (python -m moe_mtp.train), 8 thin layers so that the
#    MTP module is a small share of a decoding step;
# 3. re-aligns its MTP module on the model's own predictions along its own greedy continuations (--mtp-only; the
#    main model is left bit-identical) and saves `num_mtp_draft_tokens=adaptive`: generate then picks the drafts per
#    step from the speed it measures;
# 4. generates on held-out files with and without MTP speculation, before and after, and prints acceptance and
#    the speed ratio. `--resume` makes a second `make quickstart` reuse the finished run in QUICKSTART_DIR.
# A test runs it with QUICKSTART_ARGS=--smoke GENERATE_ARGS=--smoke.
QUICKSTART_DIR ?= outputs/quickstart
QUICKSTART_CORPUS_BYTES ?= 6000000
QUICKSTART_MODEL ?= --num-layers 8 --hidden-size 192 --intermediate-size 384 --moe-intermediate-size 96 \
	--q-lora-rank 96 --kv-lora-rank 64 --lr 2e-3
# Sized to the 8-minute budget on 2 cores, venv included (docs/claims.md has the timed run).
QUICKSTART_ARGS ?= --max-steps 320 --eval-every 80 --eval-batches 8 --save-every 160
ALIGN_ARGS ?= --max-steps 120 --eval-batches 8 --acceptance-prompts 4
# Data flags both training and re-alignment need, so that they share one token store and held-out split.
QUICKSTART_DATA ?=
GENERATE_ARGS ?= --num-prompts 12 --max-new-tokens 48 --repeats 1

quickstart: $(INSTALL_STAMP)
	$(PY) -m moe_mtp.corpora stdlib-code $(QUICKSTART_DIR)/corpus --max-bytes $(QUICKSTART_CORPUS_BYTES)
	$(PY) -m moe_mtp.train --data $(QUICKSTART_DIR)/corpus/train.jsonl --output-dir $(QUICKSTART_DIR) --resume \
		$(QUICKSTART_MODEL) $(QUICKSTART_DATA) $(QUICKSTART_ARGS)
	$(PY) -m moe_mtp.train --mtp-only --model $(QUICKSTART_DIR)/model --data $(QUICKSTART_DIR)/corpus/train.jsonl \
		--output-dir $(QUICKSTART_DIR)/aligned --overwrite $(filter --smoke --no-progress,$(QUICKSTART_ARGS)) \
		$(QUICKSTART_DATA) $(ALIGN_ARGS)
	$(PY) examples/speculative_generate.py --model $(QUICKSTART_DIR)/model $(QUICKSTART_DIR)/aligned/model \
		--prompts $(QUICKSTART_DIR)/corpus/heldout.jsonl --output-dir $(QUICKSTART_DIR) $(GENERATE_ARGS)
	@echo "quickstart: plots, metrics and the Hub-ready model folders (model/, aligned/model/) are in $(QUICKSTART_DIR)/"

# Build outputs and caches; leaves .venv and outputs/ (training results) alone.
clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Everything `clean` removes, plus the venv.
distclean: clean
	rm -rf $(VENV) $(OLDEST_VENV)
