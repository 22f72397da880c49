# flowserve: the HTTP service and the bundled models, on ONNX Runtime's CPU build (the
# default target) or its CUDA build (--target gpu).
#   docker build -t flowserve .
#   docker run --rm -p 8080:8080 flowserve
# Serve other packages by mounting a repository over /models (<name>/<version>/flow.json).

FROM rust:1.95-bookworm AS build
# Versions come with the bookworm base image's point release; pinning exact Debian versions
# breaks the build whenever a security update replaces them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The ONNX Runtime library from its pinned PyPI wheel (sha256-checked), as `make ort` does.
# The crate registry and target folder are build caches, so a rebuild compiles only what
# changed; debug info is stripped (symbols stay, for backtraces): 111 MB -> 31 MB.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    scripts/fetch-ort.sh /opt/ort \
 && cargo build --release --locked -p flowserve \
 && cp target/release/flowserve /usr/local/bin/flowserve

# ONNX Runtime's CUDA build and the CUDA 13 runtime (pinned PyPI wheels, sha256-checked by
# pip), for the GPU image only.
FROM build AS gpu-libs
RUN scripts/fetch-ort-gpu.sh /opt/ort --cuda-runtime

# What both images share: the server, non-root, the bundled models, the probes.
FROM debian:bookworm-slim AS runtime
# libstdc++ for ONNX Runtime (and ca-certificates); versions as above.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libstdc++6 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home flowserve
COPY --from=build /usr/local/bin/flowserve /usr/local/bin/flowserve
COPY models/ /models/
ENV FLOWSERVE_MODELS=/models \
    FLOWSERVE_HOST=0.0.0.0 \
    FLOWSERVE_PORT=8080 \
    FLOWSERVE_LOG_FORMAT=json
USER 10001
EXPOSE 8080
# Docker, Compose and ECS use this; Kubernetes uses the probes in deploy/.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["/usr/local/bin/flowserve", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/flowserve"]

# The GPU image: docker build --target gpu -t flowserve-gpu .   (about 2.5 GB; run it with
# the NVIDIA container toolkit, e.g. docker run --gpus 1, or deploy/overlays/gpu). CUDA only:
# a pod that cannot reach the GPU refuses its models and stays unready, never a silent CPU.
FROM runtime AS gpu
COPY --from=gpu-libs /opt/ort/ /opt/ort/
ENV ORT_DYLIB_PATH=/opt/ort/libonnxruntime.so.1.31.1 \
    LD_LIBRARY_PATH=/opt/ort/cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    FLOWSERVE_EXECUTION_PROVIDERS=cuda

# The CPU image, the default target.
FROM runtime AS cpu
COPY --from=build /opt/ort/ /opt/ort/
ENV ORT_DYLIB_PATH=/opt/ort/libonnxruntime.so.1.32.0
