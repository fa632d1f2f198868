# NeurIPS 2023 LLM Efficiency Challenge toolkit: specs -> zips -> images -> validated containers.
# `make help` lists the targets. The first target that needs Python creates .venv/.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed

# Switches: STRICT=1 refuses unpinned revisions; OFFLINE=1 builds images from the local base
# image and wheelhouse with no weights inside; MODEL=dir (ADAPTER=dir) mounts local weights.
STRICT  ?=
OFFLINE ?=
MODEL   ?=
ADAPTER ?=
yes = $(filter 1 yes true,$(1))
STRICT_FLAG  := $(if $(call yes,$(STRICT)),--strict)
OFFLINE_FLAG := $(if $(call yes,$(OFFLINE)),--offline)
OFFLINE_DEPS := $(if $(call yes,$(OFFLINE)),base-image wheelhouse)
MODEL_FLAGS  := $(if $(MODEL),--model $(MODEL)) $(if $(ADAPTER),--adapter $(ADAPTER))

.DEFAULT_GOAL := help
.PHONY: docs helm-venv helm-lock eval-compare helm-mix prune local-inputs help venv lock specs submissions test clean base-image wheelhouse tiny-model tiny-gptq convert

# Model stages: SRC/OUT (convert), MODEL=dir, DATA_DIR=dir, OUT=dir (quantize, data, train), DRY_RUN=1,
# BUDGET=ignore (quantize, train, humpback), STEPS=n and DEADLINE=when (train: stop cleanly there, checkpoint saved), PASSAGES=n (humpback), HUMPBACK=dir (data, train:
# make humpback-N's curated/ folder when OUT moved it), SUBMISSIONS=dir (model stages: specs from another folder).
SRC      ?=
OUT      ?=
DATA_DIR ?=
DRY_RUN  ?=
BUDGET   ?=
STEPS    ?=
DEADLINE ?=
PASSAGES ?=
HUMPBACK ?=
SUBMISSIONS ?=
SUBS_FLAG      := $(if $(SUBMISSIONS),--submissions $(SUBMISSIONS))
# Per-submission targets take any spec name: `make validate-mine` for submissions/mine/spec.toml,
# and `make validate-1` as short for submissions/submission-1/.
SUBS_DIR := $(or $(SUBMISSIONS),submissions)
DIST ?=
PORT ?=
# A switch a target cannot honour is refused, never silently dropped.
refuse = $(if $(strip $(foreach v,$(1),$($(v)))),$(error $(foreach v,$(1),$(if $($(v)),$(v)=$($(v)))) has no meaning for $@: $(2)))
DIST_FLAG := $(if $(DIST),--dist $(DIST))
name = $(if $(wildcard $(SUBS_DIR)/$(1)/spec.toml),$(1),submission-$(1))
DATA_FLAGS     := $(if $(MODEL),--model $(MODEL)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(OUT),--out $(OUT)) \
                  $(if $(HUMPBACK),--humpback $(HUMPBACK))
HUMPBACK_FLAGS := $(if $(MODEL),--model $(MODEL)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(OUT),--out $(OUT)) \
                  $(if $(PASSAGES),--passages $(PASSAGES)) $(if $(filter ignore,$(BUDGET)),--budget ignore)
QUANTIZE_FLAGS := $(if $(MODEL),--model $(MODEL)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(OUT),--out $(OUT)) \
                  $(if $(call yes,$(DRY_RUN)),--dry-run) $(if $(filter ignore,$(BUDGET)),--budget ignore)
# make train-N: the data stage first (into OUT/data when OUT is given), then training.
TRAIN_DATA_FLAGS := $(if $(MODEL),--model $(MODEL)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(OUT),--out $(OUT)/data) \
                    $(if $(HUMPBACK),--humpback $(HUMPBACK))
TRAIN_FLAGS      := $(if $(MODEL),--model $(MODEL)) $(if $(OUT),--out $(OUT) --data $(OUT)/data) \
                    $(if $(STEPS),--steps $(STEPS)) $(if $(DEADLINE),--deadline $(DEADLINE)) $(if $(filter ignore,$(BUDGET)),--budget ignore)

# MODEL, ADAPTER and DATA_DIR must be folders: checked before any slow prerequisite (base image, wheelhouse).
local-inputs:
	@for v in "MODEL=$(MODEL)" "ADAPTER=$(ADAPTER)" "DATA_DIR=$(DATA_DIR)"; do \
	    d="$${v#*=}"; if [ -n "$$d" ] && [ ! -d "$$d" ]; then echo "error: $$v: not a folder" >&2; exit 2; fi; \
	done

help: ## list the targets
	@echo "Usage: make <target> [STRICT=1] [OFFLINE=1] [MODEL=dir] [ADAPTER=dir] [DATA_DIR=dir] [OUT=dir] [DRY_RUN=1] [BUDGET=ignore] [STEPS=n] [DEADLINE=when] [PASSAGES=n] [CONF=file] [SUITE=name] [URL=url] [MAX_EVAL_INSTANCES=n]"
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/%/N/; s/:.*## /\t/' | awk -F'\t' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): requirements/dev.txt requirements/docs.txt requirements/helm.txt requirements/gpu.txt docker/inference/requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "creating $(VENV)/ with the pinned dev and test dependencies (a few minutes the first time)"
	$(PIP) install --progress-bar on -r requirements/dev.txt -r requirements/docs.txt
	$(PIP) install -q --no-deps -r requirements/helm.txt
	$(PIP) install -q --no-deps -r requirements/gpu.txt
	$(PIP) install -q --no-deps -e .
	touch $@

venv: $(STAMP) ## create .venv/ with the pinned dev and test dependencies

zip-%: $(STAMP) ## build dist/NAME.zip for any spec: make zip-mine (submissions/mine/), make zip-1
	$(call refuse,OFFLINE MODEL ADAPTER,a zip never holds weights; use validate-N or serve-N)
	$(PY) -m packager $(SUBS_FLAG) build $(STRICT_FLAG) $(DIST_FLAG) $(call name,$*)

submission-%: $(STAMP) ## build dist/submission-N.zip and its build context dist/submission-N/
	$(call refuse,OFFLINE MODEL ADAPTER,a zip never holds weights; use validate-N or serve-N)
	$(PY) -m packager $(SUBS_FLAG) build $(STRICT_FLAG) $(DIST_FLAG) $(call name,$*)

submissions: $(STAMP) ## build every submission's zip into dist/
	$(PY) -m packager $(SUBS_FLAG) build $(STRICT_FLAG) $(DIST_FLAG)

specs: $(STAMP) ## validate every spec under submissions/
	$(PY) -m packager $(SUBS_FLAG) check $(STRICT_FLAG)

test: $(STAMP) ## run the whole test suite (CPU, no network)
	$(PY) -m pytest

image-%: $(STAMP) local-inputs $(OFFLINE_DEPS) ## docker build of dist/submission-N.zip's own Dockerfile
	$(call refuse,MODEL ADAPTER,local weights are mounted at run time; use validate-N or serve-N)
	$(PY) -m packager $(SUBS_FLAG) image $(STRICT_FLAG) $(OFFLINE_FLAG) $(call name,$*)

validate-%: $(STAMP) local-inputs $(OFFLINE_DEPS) ## build, run with --network none, drive with HELM's client, report
	$(PY) -m packager.validate $(call name,$*) $(SUBS_FLAG) $(STRICT_FLAG) $(OFFLINE_FLAG) $(MODEL_FLAGS)

serve-%: $(STAMP) local-inputs $(OFFLINE_DEPS) ## run submission-N's container in the foreground on 127.0.0.1:8080
	$(PY) -m packager $(SUBS_FLAG) serve $(STRICT_FLAG) $(OFFLINE_FLAG) $(MODEL_FLAGS) $(DIST_FLAG) $(if $(PORT),--port $(PORT)) $(call name,$*)

convert: $(STAMP) ## Qwen (v1) model or LoRA adapter folder -> Qwen2 layout: SRC=dir OUT=dir
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make convert SRC=<Qwen v1 model or adapter folder> OUT=<new folder>" >&2; exit 2; }
	$(PY) -m pipeline.convert $(SRC) $(OUT)

quantize-%: $(STAMP) ## GPTQ of submission-N's base model -> build/artifacts/submission-N/ (+ report.json)
	$(PY) -m pipeline.quantize $(call name,$*) $(SUBS_FLAG) $(QUANTIZE_FLAGS)

data-%: $(STAMP) ## submission-N's [[training.data]] -> build/data/submission-N/ (tokenized set, rendered.jsonl, manifest)
	$(PY) -m pipeline.data $(call name,$*) $(SUBS_FLAG) $(DATA_FLAGS)

train-%: $(STAMP) ## data-N if needed, then QLoRA -> build/train/submission-N/adapter/; run again to resume
	$(PY) -m pipeline.data $(call name,$*) $(SUBS_FLAG) $(TRAIN_DATA_FLAGS)
	$(PY) -m pipeline.train $(call name,$*) $(SUBS_FLAG) $(TRAIN_FLAGS)

humpback-%: $(STAMP) ## Humpback self-augmentation -> build/humpback/submission-N/curated/ (read by data-N); run again to resume
	$(PY) -m pipeline.humpback $(call name,$*) $(SUBS_FLAG) $(HUMPBACK_FLAGS)

# make plan-N / day-N (the challenge's day): MODEL=dir (the quantized artifact: no quantize), BASE=dir (quantize's
# local base model), DATA_DIR, OUT (every stage's folder under it), PASSAGES, STEPS, BUDGET=ignore, OFFLINE and STRICT
# (zip, validate), VALIDATE=0 (end with the zip), EVAL=1 (then make eval-N), JSON=1 (the plan as JSON).
BASE     ?=
EVAL     ?=
VALIDATE ?=
JSON     ?=
DAY_FLAGS := $(SUBS_FLAG) $(if $(MODEL),--model $(MODEL)) $(if $(BASE),--base $(BASE)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
             $(if $(OUT),--out $(OUT)) $(if $(PASSAGES),--passages $(PASSAGES)) $(if $(STEPS),--steps $(STEPS)) \
             $(if $(filter ignore,$(BUDGET)),--budget ignore) $(OFFLINE_FLAG) $(STRICT_FLAG) \
             $(if $(filter 0 no false,$(VALIDATE)),--no-validate) $(if $(call yes,$(EVAL)),--eval)

plan-%: $(STAMP) ## budget submission-N's whole day against 24 h on a 4090: one table, levers; exit 2 over budget (JSON=1)
	$(call refuse,ADAPTER,the day trains its own adapter)
	$(PY) -m pipeline.day plan $(call name,$*) $(DAY_FLAGS) $(if $(call yes,$(JSON)),--json)

day-%: $(STAMP) ## the day: plan, then every stage in order (run again to resume), zip, validate-N, eval-N (EVAL=1), report
	$(call refuse,ADAPTER,the day trains its own adapter)
	$(PY) -m pipeline.day run $(call name,$*) $(DAY_FLAGS) --again 'make day-$* $(MAKEOVERRIDES)'

publish-humpback-%: $(STAMP) ## upload build/humpback/submission-N/curated/ to the humpback source's dataset repo (HF_TOKEN)
	$(PY) -m pipeline.publish $(call name,$*) $(SUBS_FLAG) --humpback $(if $(OUT),--curated $(OUT)/curated)

train-bundle-%: $(STAMP) ## the training reproduction bundle -> dist/submission-N-train.zip (Dockerfile, code, spec)
	$(PY) -m packager.train_bundle $(call name,$*) $(SUBS_FLAG) $(DIST_FLAG)

publish-train-%: $(STAMP) ## upload build/train/submission-N/adapter/ to the spec's [adapter] repo (HF_TOKEN); prints the commit
	$(PY) -m pipeline.publish $(call name,$*) $(SUBS_FLAG) --train $(if $(OUT),--run $(OUT))

publish-%: $(STAMP) ## upload build/artifacts/submission-N/ to the spec's [artifact] repo (HF_TOKEN); prints the commit to pin
	$(PY) -m pipeline.publish $(call name,$*) $(SUBS_FLAG) $(if $(OUT),--artifact $(OUT))

base-image: $(STAMP) ## build the offline CPU base image: debootstrap bookworm + torch (root, Docker)
	$(PY) -m packager.offline base-image

wheelhouse: $(STAMP) ## download the locked requirements' wheels into build/wheelhouse/
	$(PY) -m packager.offline wheelhouse

tiny-model: $(STAMP) ## write the tiny Qwen-shaped stand-in model to build/tiny-model/
	$(PY) -m packager.tiny_model build/tiny-model

tiny-gptq: $(STAMP) ## write the tiny stand-in quantized to 8-bit GPTQ to build/tiny-gptq/
	$(PY) -m pipeline.quantize.tiny build/tiny-gptq

# HELM itself lives in .venv-helm/ (its requirements conflict with the toolkit's), from a pinned lock.
HELM_VENV  := .venv-helm
HELM_STAMP := $(HELM_VENV)/.installed
CONF ?=
SUITE ?=
URL ?=
MAX_EVAL_INSTANCES ?=
A ?=
B ?=
EVAL_FLAGS := $(OFFLINE_FLAG) $(MODEL_FLAGS) $(if $(CONF),--conf $(CONF)) $(if $(SUITE),--suite $(SUITE)) \
              $(if $(URL),--url $(URL)) $(if $(MAX_EVAL_INSTANCES),--max-eval-instances $(MAX_EVAL_INSTANCES))
# With URL the server is already running: no base image, wheelhouse or build.
EVAL_DEPS := $(if $(URL),,$(OFFLINE_DEPS))

$(HELM_STAMP): requirements/helm-eval.lock
	test -x $(HELM_VENV)/bin/python || $(PYTHON) -m venv $(HELM_VENV)
	@echo "creating $(HELM_VENV)/ with HELM (crfm-helm 0.5.16) from requirements/helm-eval.lock (a few minutes the first time)"
	$(HELM_VENV)/bin/python -m pip --disable-pip-version-check install -q --no-deps -r requirements/helm-eval.lock
	touch $@

helm-venv: $(HELM_STAMP) ## create .venv-helm/ with HELM itself (helm-run, helm-summarize) from its pinned lock

helm-lock: ## re-resolve .venv-helm's lock from crfm-helm's declared requirements (needs PyPI)
	$(PYTHON) -m evaluation.lock requirements/helm-eval.lock

eval-%: $(STAMP) $(HELM_STAMP) local-inputs $(EVAL_DEPS) ## helm-run the challenge's sample run specs against submission-N's container, summarize, report
	$(PY) -m evaluation $(call name,$*) $(SUBS_FLAG) $(STRICT_FLAG) $(EVAL_FLAGS)

eval-compare: $(STAMP) ## two evals side by side per scenario: make eval-compare A=build/eval/x/suite B=...
	@test -n "$(A)" -a -n "$(B)" || { echo "usage: make eval-compare A=<suite folder> B=<suite folder> (folders written by make eval-N, e.g. build/eval/submission-1/offline)" >&2; exit 2; }
	$(PY) -m evaluation.compare $(A) $(B)

helm-mix: $(STAMP) ## replay HELM's request mix (the challenge's sample conf) against a running submission: URL=http://host:port
	@test -n "$(URL)" || { echo "usage: make helm-mix URL=http://127.0.0.1:8080 (a running submission, e.g. from make serve-1)" >&2; exit 2; }
	$(PY) benchmarks/helm_mix.py --url $(URL)

lock: $(STAMP) ## re-resolve docker/inference/requirements.in into requirements.lock (needs PyPI)
	$(PY) -m packager.lock

prune: $(STAMP) ## remove the toolkit's stale images (older specs' builds, dangling layers); never any other image
	$(PY) -m packager prune

docs: $(STAMP) ## build the documentation site (docs/, mkdocs.yml) into build/docs/; warnings are errors
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir build/docs

clean: ## remove dist/ and build/ (keeps .venv/ and Docker images)
	rm -rf dist build
