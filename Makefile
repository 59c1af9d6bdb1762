# fmsearch's front door. Every target installs the project into .venv first (once, guarded by a stamp).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
STUDY ?= smoke
TRIALS ?=
JOBS ?= 1
EPOCHS ?=
TIME ?=
DEVICE ?=
PORT ?= 8080
STORAGE ?=
ARGS ?=

# The storage URL reaches fmsearch through its environment, never its command line: a password in
# it stays out of make's echo of each command and out of `ps`.
ifneq ($(STORAGE),)
export FMSEARCH_STORAGE := $(STORAGE)
endif

# Every variable reaches the shell single-quoted (q), so `STUDY='smoke; rm -rf ~'` is a study name that
# fmsearch refuses, never a command. ARGS is split into words at spaces and each word quoted (qw): an
# argument that itself holds a space cannot be carried, so run .venv/bin/fmsearch directly for that.
# make expands `$` in every variable, STORAGE included: write `$$` for a `$`, or set FMSEARCH_STORAGE
# in the environment instead of STORAGE.
q = '$(subst ','\'',$(1))'
qw = $(foreach word,$(1),$(call q,$(word)))
study_flags = $(if $(TRIALS),--trials $(call q,$(TRIALS))) --jobs $(call q,$(JOBS)) \
	$(if $(EPOCHS),--epochs $(call q,$(EPOCHS))) $(if $(TIME),--time $(call q,$(TIME))) \
	$(if $(DEVICE),--device $(call q,$(DEVICE)))
# TIME bounds the search and the confirmation together: both count from make's start (--since).
STARTED := $(if $(TIME),$(shell date +%s))
confirm_flags = $(if $(TRIALS),--trials $(call q,$(TRIALS))) --jobs $(call q,$(JOBS)) \
	$(if $(DEVICE),--device $(call q,$(DEVICE))) \
	$(if $(TIME),--time $(call q,$(TIME)) --since $(call q,$(STARTED)))

.DEFAULT_GOAL := help
.PHONY: help setup data test lint format train study report dashboard bench browser postgres clean distclean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'
	@printf '  variables: STUDY=%s TRIALS= JOBS=%s EPOCHS= TIME= DEVICE= PORT=%s ARGS=\n' $(call q,$(STUDY)) \
		$(call q,$(JOBS)) $(call q,$(PORT))
	@echo "             STORAGE= (default: \$$FMSEARCH_STORAGE, else sqlite:///results/studies.db)"

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install fmsearch with its dev tools and PostgreSQL driver

data: $(STAMP) ## find, fetch and verify Fashion-MNIST (local files, Debian's package, then download)
	@if [ ! -e "$${FMSEARCH_DATA:-data}/FashionMNIST/raw/t10k-labels-idx1-ubyte" ] && \
		[ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "dataset-fashion-mnist could not be installed: fmsearch will try torchvision's download"; \
	fi
	$(BIN)/fmsearch data

browser: ## install Debian's chromium for the dashboard browser test (when apt is there and we are root)
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium for the browser test"; \
		(apt-get install -y -q chromium >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) || \
		echo "chromium could not be installed: the browser test will be skipped"; \
	fi

postgres: ## install Debian's PostgreSQL server for the multi-machine tests (when apt is there and we are root)
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing postgresql for the storage tests"; \
		(apt-get install -y -q postgresql >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1)) || \
		echo "postgresql could not be installed: the PostgreSQL tests will be skipped"; \
	fi

test: data browser postgres ## run the test suite
	$(BIN)/pytest -q -n auto --dist loadgroup

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## ruff format in place
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

train: data ## train one configuration: make train ARGS="--arch adaptive --epochs 10"
	$(BIN)/fmsearch train $(call qw,$(ARGS))

study: data ## run or resume a study, confirm its bests on new seeds, then report: make study STUDY=semi [TRIALS=] [JOBS=] [TIME=1h]
	$(BIN)/fmsearch study $(call q,$(STUDY)) $(study_flags)
	$(BIN)/fmsearch confirm $(call q,$(STUDY)) $(confirm_flags)
	$(BIN)/fmsearch report $(call q,$(STUDY))

report: $(STAMP) ## redraw a study's figures and summary.md from the storage: make report STUDY=semi
	$(BIN)/fmsearch report $(call q,$(STUDY))

dashboard: $(STAMP) ## serve optuna-dashboard on 127.0.0.1:8080 (PORT= overrides)
	$(BIN)/fmsearch dashboard --port $(call q,$(PORT))

bench: data ## fmsearch's loop against the assignment's loop; JSON in results/bench/ (ARGS="--threads 1,2")
	$(BIN)/fmsearch bench $(call qw,$(ARGS))

clean: ## remove caches and build files (results stay)
	rm -rf .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean ## also remove .venv, data/, the study database, artifacts and weights
	rm -rf $(VENV) data results/studies.db* results/artifacts results/*/weights results/*/*.pt
