# Staged pipeline: each target is a stage's manifest.json, so `make` re-runs only stale stages.
#   make all                      whole pipeline on the default corpus and the CPU preset
#   make test                     the test suite (every tier); make test-unit: the fast unit tier
#   make controls RUN=x           the compression controls (dense+, finetune, scratch; part of make all)
#   make pretrain RUN=x PRESET=tiny LAUNCHER=deepspeed NGPU=2
#   make classify TASK=classify LAUNCHER=horovod NGPU=2   stage 02b under horovodrun (scripts/install_horovod.sh first)
#   make prune FORCE=1 PRUNE_ARGS="--sparsity 0.7"   re-run the named stage(s) alone, --overwrite, changed settings
#   make clean-run RUN=x          delete results/x;  make lint: ruff;  make tensorboard TB_PORT=6007
# Variables (override on the command line):
# TASK=classify: the encoder path (BERT masked-LM pretraining, then genre classification; presets encoder-*)
TASK         ?= lm
RUN          ?= $(if $(filter classify,$(TASK)),classify,default)
PRESET       ?= $(if $(filter classify,$(TASK)),encoder-cpu,cpu)
LAUNCHER     ?= python
NGPU         ?= 1
PRUNE_METHOD ?= magnitude
SPARSITY     ?= 0.5
DS_CONFIG    ?= ds_configs/zero2_fp16.json
ACCEL_CONFIG ?= ds_configs/accelerate/zero2.yaml
DATA         ?=
# extra --key value options for one stage's script, e.g. PRETRAIN_ARGS="--max_steps 100 --lr 1e-3"
DATA_ARGS    ?=
PRETRAIN_ARGS ?=
PRUNE_ARGS   ?=
CLASSIFY_ARGS ?=
DISTILL_ARGS ?=
EVAL_ARGS    ?=
CONTROLS_ARGS ?=
# compression controls trained by `make controls` (each its own target; CONTROLS= skips them), see pipeline/controls.py;
# the cpu preset leaves out scratch_full (stage 02 + 04's 800 steps) so that make all stays under 15 min on 2 cores
CONTROLS     ?= dense_plus finetune scratch $(if $(filter cpu,$(PRESET)),,scratch_full)
REPORT_ARGS  ?=
# make bench: engine against plain PyTorch on 1, 2 and 4 GPUs (counts above those visible are skipped)
BENCH_ARGS   ?= --gpus 1,2,4 --parallel
TB_PORT      ?= 6006
PYTEST_ARGS  ?=
# FORCE=1 re-runs the stages named on the command line (and only those) with --overwrite, e.g. `make prune FORCE=1`
FORCE        ?=
VENV         ?= .venv
# PY=python3 uses an interpreter that already has the packages (e.g. a GPU image) and skips the set-up.
PY           ?= $(VENV)/bin/python

R := results/$(RUN)
SETUP := $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/.installed,)
# DeepSpeed picks its accelerator itself; without an NVIDIA driver use its CPU accelerator (gloo, bf16/fp32).
export DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
# NVLink multicast stays off on shared multi-GPU hosts.
export NCCL_NVLS_ENABLE ?= 0
export PYTHONUNBUFFERED := 1
# DeepSpeed's JIT-built ops (deepspeed_shm_comm on CPU, FusedAdam on CUDA) are cached with this venv, not in ~/.cache
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
# the DeepSpeed launcher's info lines (and, on one node, its missing-hostfile warning) are noise here; errors stay
DS_LAUNCH_ARGS ?= $(if $(filter cpu,$(DS_ACCELERATOR)),--log_level error,--log_level warning)

# rendezvous port for multi-process launches; a free one by default (29500 may be taken on a shared machine)
MASTER_PORT  ?= $(shell python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 29500)

ifeq ($(LAUNCHER),python)
  LAUNCH := $(PY)
else ifeq ($(LAUNCHER),deepspeed)
  LAUNCH = $(PY) -m deepspeed.launcher.runner --num_gpus $(NGPU) --master_port $(MASTER_PORT) --no_local_rank $(DS_LAUNCH_ARGS)
else ifeq ($(LAUNCHER),accelerate)
  LAUNCH = $(PY) -m accelerate.commands.accelerate_cli launch --config_file $(ACCEL_CONFIG) --num_processes $(NGPU) --main_process_port $(MASTER_PORT)
else ifeq ($(LAUNCHER),horovod)
  # Horovod runs the classification stage only (--backend horovod); the other stages run as one process
  ifneq ($(TASK),classify)
    $(error LAUNCHER=horovod is for TASK=classify (stage 02b); the decoder path runs under python, deepspeed or accelerate)
  endif
  LAUNCH := $(PY)
else
  $(error LAUNCHER must be python, deepspeed, accelerate or horovod, not '$(LAUNCHER)')
endif
# stage 02b under horovodrun: NGPU processes on this host, Gloo (pipeline/horovod_backend.py)
CLASSIFY_LAUNCH = $(if $(filter horovod,$(LAUNCHER)),$(PY) -m horovod.runner.launch -np $(NGPU) -H localhost:$(NGPU) --gloo $(PY),$(LAUNCH))

ifeq ($(filter $(TASK),lm classify),)
  $(error TASK must be lm or classify, not '$(TASK)')
endif

ifeq ($(filter $(PRUNE_METHOD),magnitude nm structured),)
  $(error PRUNE_METHOD must be magnitude, nm or structured, not '$(PRUNE_METHOD)')
endif

COMMON := --run $(RUN) --preset $(PRESET)

# FORCE=1: each stage named in the goals is out of date whatever the files say, and gets --overwrite; its
# prerequisites are left alone (unlike `make -B`, which rebuilds them all)
STAGE_FILES := data=$(R)/01_data/manifest.json pretrain=$(R)/02_pretrain/manifest.json \
  prune=$(R)/03_prune/manifest.json distill=$(R)/04_distill/manifest.json eval=$(R)/05_eval/manifest.json \
  report=$(R)/report.md
FORCED := $(if $(FORCE),$(filter $(MAKECMDGOALS),data pretrain prune distill eval report),)
ifneq ($(FORCED),)
$(foreach s,$(FORCED),$(patsubst $(s)=%,%,$(filter $(s)=%,$(STAGE_FILES)))): .FORCE
.PHONY: .FORCE
endif
OVERWRITE = $(if $(filter $(1),$(FORCED)),--overwrite,)

.PHONY: all setup data pretrain prune distill eval report test test-unit test-integration test-compat test-gpu lint tensorboard bench clean-run help controls classify
.DELETE_ON_ERROR:

all: report

help:
	@sed -n '1,33p' Makefile

setup: $(SETUP)

$(VENV)/.installed: pyproject.toml scripts/setup_env.sh
	scripts/setup_env.sh $(VENV) 2>&1 | grep -v "is ignored: it is neither"; test -f $@

data: $(R)/01_data/manifest.json
pretrain: $(R)/02_pretrain/manifest.json
prune: $(R)/03_prune/manifest.json
distill: $(R)/04_distill/manifest.json
eval: $(R)/05_eval/manifest.json
report: $(R)/report.md

$(R)/01_data/manifest.json: $(SETUP)
	$(PY) scripts/prepare_data.py $(COMMON) --world_size $(NGPU) $(if $(DATA),--data $(DATA),) $(DATA_ARGS)$(if $(filter classify,$(TASK)), --task classify,) $(call OVERWRITE,data)

ifeq ($(TASK),classify)
# the encoder path: 02 masked-LM pretraining, 02b classification, then 03-05 compress the classifier
classify: $(R)/02b_classify/manifest.json

$(R)/02_pretrain/manifest.json: $(R)/01_data/manifest.json
	$(LAUNCH) scripts/pretrain_encoder.py $(COMMON) --ds_config $(DS_CONFIG) --resume auto $(PRETRAIN_ARGS)

$(R)/02b_classify/manifest.json: $(R)/02_pretrain/manifest.json
	$(CLASSIFY_LAUNCH) scripts/classify.py $(COMMON) --ds_config $(DS_CONFIG) --resume auto$(if $(filter horovod,$(LAUNCHER)), --backend horovod,) $(CLASSIFY_ARGS)

$(R)/03_prune/manifest.json: $(R)/02b_classify/manifest.json
	$(PY) scripts/prune_classifier.py $(COMMON) --method $(PRUNE_METHOD) --sparsity $(SPARSITY) $(PRUNE_ARGS)

$(R)/04_distill/manifest.json: $(R)/03_prune/manifest.json
	$(LAUNCH) scripts/distill_classifier.py $(COMMON) --ds_config $(DS_CONFIG) --resume auto $(DISTILL_ARGS)

# the classifier's compression controls (pipeline/classify_controls.py), one manifest each, so only stale ones
# re-run; CONTROLS= skips them (scratch_full is the decoder's: the classifier's scratch has stage 02b + 04's steps)
CLASSIFY_CONTROLS := $(filter-out scratch_full,$(CONTROLS))
CONTROL_MANIFESTS := $(foreach c,$(CLASSIFY_CONTROLS),$(R)/06_controls/$(c)/manifest.json)
controls: $(CONTROL_MANIFESTS)

$(CONTROL_MANIFESTS): $(R)/06_controls/%/manifest.json: $(R)/04_distill/manifest.json
	$(LAUNCH) scripts/controls_classifier.py $(COMMON) --control $* --resume auto $(CONTROLS_ARGS)

$(R)/05_eval/manifest.json: $(R)/04_distill/manifest.json $(CONTROL_MANIFESTS)
	$(PY) scripts/evaluate_classifier.py $(COMMON) $(EVAL_ARGS)

$(R)/report.md: $(R)/05_eval/manifest.json
	$(PY) scripts/report_classify.py $(COMMON) $(REPORT_ARGS)
else
$(R)/02_pretrain/manifest.json: $(R)/01_data/manifest.json
	$(LAUNCH) scripts/pretrain.py $(COMMON) --ds_config $(DS_CONFIG) --resume auto $(PRETRAIN_ARGS) $(call OVERWRITE,pretrain)

$(R)/03_prune/manifest.json: $(R)/02_pretrain/manifest.json
	$(PY) scripts/prune.py $(COMMON) --method $(PRUNE_METHOD) --sparsity $(SPARSITY) $(PRUNE_ARGS) $(call OVERWRITE,prune)

$(R)/04_distill/manifest.json: $(R)/03_prune/manifest.json
	$(LAUNCH) scripts/distill.py $(COMMON) --ds_config $(DS_CONFIG) --resume auto $(DISTILL_ARGS) $(call OVERWRITE,distill)

$(R)/05_eval/manifest.json: $(R)/04_distill/manifest.json
	$(PY) scripts/evaluate.py $(COMMON) $(EVAL_ARGS) $(call OVERWRITE,eval)

$(R)/report.md: $(R)/05_eval/manifest.json
	$(PY) scripts/report.py $(COMMON) $(REPORT_ARGS) $(call OVERWRITE,report)

# Compression controls: one manifest per control, so only stale ones re-run; stage 05 evaluates them too.
CONTROL_MANIFESTS := $(foreach c,$(CONTROLS),$(R)/06_controls/$(c)/manifest.json)
controls: $(CONTROL_MANIFESTS)

$(CONTROL_MANIFESTS): $(R)/06_controls/%/manifest.json: $(R)/04_distill/manifest.json
	$(LAUNCH) scripts/controls.py $(COMMON) --control $* --resume auto $(CONTROLS_ARGS)

$(R)/05_eval/manifest.json: $(CONTROL_MANIFESTS)
endif

tensorboard: $(SETUP)
	$(PY) -m tensorboard.main --logdir $(R)/tb --host 127.0.0.1 --port $(TB_PORT)

# Test tiers (markers; tests/conftest.py puts each test in one): unit (fast, in-process), integration (stages end to
# end, subprocesses, launchers), compat (pipeline.compat against the libraries' own paths), gpu (skip without CUDA).
# make test: every tier; make test-unit / test-integration / test-compat / test-gpu: one tier.
# pytest's exit 5 ("no tests collected") is turned into a failure.
PYTEST_RUN = rc=$$?; if [ $$rc -eq 5 ]; then echo "make $@: pytest collected no tests" >&2; exit 1; fi; exit $$rc
test: $(SETUP)
	$(PY) -m pytest tests $(PYTEST_ARGS); $(PYTEST_RUN)

test-unit test-integration test-compat test-gpu: test-%: $(SETUP)
	$(PY) -m pytest tests -m $* $(PYTEST_ARGS); $(PYTEST_RUN)

lint: $(SETUP)
	$(PY) -m ruff check pipeline scripts tests

bench: $(SETUP)
	$(PY) scripts/bench_pretrain.py $(BENCH_ARGS)

clean-run:
	rm -rf $(R)
