# Two commands that work on a fresh clone with nothing installed:
#   make check   set up .venv, then run the packaged regression suite (pytest --gradckpt) and print the table
#   make test    set up .venv, then run the project's own tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# xdist on 2 cores only gains with one BLAS thread per worker.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export PYTHONDONTWRITEBYTECODE ?= 1

.PHONY: check check-full test matrix setup clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	# constraints.txt pins torch==2.13.0 first: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[hf,qlora,diffusers,dev]"
	touch $(STAMP)

setup: $(STAMP)

check: $(STAMP)  ## the representative subset of the zoo
	$(BIN)/pytest -o addopts= --gradckpt --pyargs pytest_gradckpt.suite -n 2 \
		--gradckpt-report=gradckpt-report.json $(ARGS)

check-full: $(STAMP)
	$(BIN)/pytest -o addopts= --gradckpt --pyargs pytest_gradckpt.suite -n 2 \
		--gradckpt-models=all --gradckpt-report=gradckpt-report.json $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -n 2 $(ARGS)

# Not part of `test`: it builds an environment per line (torch other than 2.13.0 is a multi-GB
# CUDA build, cached once in ~/.cache/pytest-gradckpt). See docs/release-lines.md.
matrix: $(STAMP)  ## the packaged suite under torch x transformers x peft lines, in throwaway venvs
	$(BIN)/python -m pytest_gradckpt matrix --json benchmarks/results/matrix-$$(date -u +%F).json $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis gradckpt-report.json
