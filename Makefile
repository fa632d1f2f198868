# NeurIPS 2023 LLM Efficiency Challenge toolkit: specs -> zips -> images -> validated containers.
# `make help` lists the targets. The first target that needs Python creates .venv/.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
STRICT ?=
PACKAGER_FLAGS := $(if $(filter 1 yes true,$(STRICT)),--strict,)
SUBMISSIONS := $(sort $(patsubst submissions/%/spec.toml,%,$(wildcard submissions/*/spec.toml)))

.DEFAULT_GOAL := help
.PHONY: help venv lock specs submissions test clean $(SUBMISSIONS) submission-N

help: ## list the targets
	@echo "Usage: make <target>   (STRICT=1 refuses unpinned revisions)"
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): requirements/dev.txt requirements/helm.txt docker/inference/requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements/dev.txt
	$(PIP) install -q --no-deps -r requirements/helm.txt
	$(PIP) install -q --no-deps -e .
	touch $@

venv: $(STAMP) ## create .venv/ with the pinned dev and test dependencies

lock: $(STAMP) ## re-resolve docker/inference/requirements.in into requirements.lock (needs PyPI)
	$(PY) -m packager.lock

specs: $(STAMP) ## validate every spec under submissions/
	$(PY) -m packager validate $(PACKAGER_FLAGS)

$(SUBMISSIONS): %: $(STAMP)
	$(PY) -m packager build $(PACKAGER_FLAGS) $@

submission-N: ## build dist/submission-N.zip and its build context dist/submission-N/ (N = 1, 2, 3)
	@echo "name a submission: $(SUBMISSIONS)"; exit 2

submissions: $(STAMP) ## build every submission's zip into dist/
	$(PY) -m packager build $(PACKAGER_FLAGS)

test: $(STAMP) ## run the whole test suite (CPU, no network)
	$(PY) -m pytest

clean: ## remove dist/ (keeps .venv/)
	rm -rf dist
