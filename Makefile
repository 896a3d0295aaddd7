# Two commands that work on a fresh clone with nothing installed:
#   make check   set up .venv, then run the packaged regression suite (pytest --gradckpt) and print the table
#   make test    set up .venv, then lint (ruff, mypy) and run the project's own tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# xdist on 2 cores only gains with one BLAS thread per worker.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export PYTHONDONTWRITEBYTECODE ?= 1

.PHONY: check check-full test test-compile test-deepspeed test-gpu lint matrix trainers-4.57 setup clean docs

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	# constraints.txt pins torch==2.13.0 first: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[hf,qlora,diffusers,trainers,dev,docs]"
	# LLaMA-Factory's checkpointing module needs only transformers and peft; its full dependency set pins old TRL.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt llamafactory
	# DeepSpeed ships an sdist whose setup.py imports torch: build it against the venv's pinned torch
	# (an isolated build sees no torch, pip could fetch an unpinned one), without precompiled ops
	# (DS_BUILD_OPS=0: the CPU tests need none). ~25 s.
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt setuptools wheel
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation -c constraints.txt deepspeed
	touch $(STAMP)

setup: $(STAMP)

check: $(STAMP)  ## the representative subset of the zoo
	$(BIN)/pytest -o addopts= --gradckpt --pyargs pytest_gradckpt.suite -n 2 \
		--gradckpt-report=gradckpt-report.json $(ARGS)

check-full: $(STAMP)
	$(BIN)/pytest -o addopts= --gradckpt --pyargs pytest_gradckpt.suite -n 2 \
		--gradckpt-models=all --gradckpt-report=gradckpt-report.json $(ARGS)

test: lint
	$(BIN)/pytest -n 2 -m "not compile_full and not deepspeed_full" $(ARGS)

test-deepspeed: $(STAMP)  ## every DeepSpeed ZeRO case (ZeRO-2/3 x full/LoRA x reentrant/non-reentrant, hazards) under torchrun, 1 and 2 CPU ranks
	$(BIN)/pytest -p no:cacheprovider -m deepspeed_full tests/test_deepspeed.py $(ARGS)

# Not part of `test` (there these are collected and skipped: no CUDA). On a GPU machine, with the
# interpreter whose torch has CUDA (no .venv: its pinned torch is the CPU build): make test-gpu PYTHON=python
test-gpu:  ## the GPU verdict campaigns (tests/gpu/, marker gpu): each skips, naming what it needs, where that is missing
	$(PYTHON) -m pytest -p no:cacheprovider -o addopts= -m gpu tests/gpu $(ARGS)

test-compile: $(STAMP)  ## every torch.compile test (inductor where a C++ compiler is present)
	$(BIN)/pytest -n 2 -p no:cacheprovider tests/test_compile.py $(ARGS)

lint: $(STAMP)  ## seconds: heavy typed dependencies are skipped (pyproject.toml [tool.mypy])
	$(BIN)/ruff check .
	$(BIN)/mypy

# Not part of `test`: it builds an environment per line (torch other than 2.13.0 is a multi-GB
# CUDA build, cached once in ~/.cache/pytest-gradckpt). See docs/release-lines.md.
matrix: $(STAMP)  ## the packaged suite under torch x transformers x peft lines, in throwaway venvs
	$(BIN)/python -m pytest_gradckpt matrix --json benchmarks/results/matrix-$$(date -u +%F).json $(ARGS)

docs: $(STAMP)  ## the reference site (docs/, API pages from the docstrings) into site/; the same strict build runs in `make test`
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

trainers-4.57: $(STAMP)  ## check_trainer's 4.57-only hazard (PEFT + default reentrant), in a throwaway venv
	$(BIN)/python tests/release_line.py 4.57.6 --with datasets==4.3.0 tests/test_trainer_release_lines.py tests/test_llamafactory.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache gradckpt-report.json site
