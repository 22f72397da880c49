#!/usr/bin/env bash
# Builds the Dockerfile with podman and runs the image the way deploy/ does: read-only root
# filesystem, non-root user 10001, no capabilities, no new privileges. Passes when the container
# answers 200 on /v2/health/ready, serves a /log_prob request, and its HEALTHCHECK
# (`flowserve healthcheck`) reports healthy.
#
# Where no container registry can be reached, the two base images the Dockerfile names are
# assembled from Debian's packages with mmdebstrap and stored under those names:
#   debian:bookworm-slim  minbase bookworm
#   rust:1.95-bookworm    bookworm with build-essential, python3-pip, and this machine's Rust
#                         toolchain (the same version, checked) copied into /usr/local/rust
# Both trust this machine's local CAs (/usr/local/share/ca-certificates), as its own tools do.
# The Dockerfile itself is built unchanged, with --pull=never.
#
# Needs root and Debian: podman, runc and mmdebstrap are installed with apt when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# --gpu: the Dockerfile's gpu target instead (pulls 1.5 GB of CUDA wheels; not in make test).
# Without a GPU it cannot serve, so it passes when the models are refused for want of the
# driver (libcuda.so.1) or a GPU alone, never of another library: the CUDA build and its
# runtime are complete.
TARGET=cpu
[ "${1:-}" = --gpu ] && TARGET=gpu
IMAGE=${IMAGE:-localhost/flowserve-$TARGET:check}
PORT=${PORT:-18080}
RUST_VERSION=1.95
SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}
# runc, not crun: crun refuses hybrid cgroup v1/v2 hosts such as this one. The ulimits stay
# within the host's hard limits (podman's defaults ask for more than an unprivileged VM grants).
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit "nofile=1024:$(ulimit -Hn)" --ulimit nproc=4096:4096)

say() { echo "image-check: $*" >&2; }

need=()
for t in podman:podman runc:runc mmdebstrap:mmdebstrap curl:curl; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { say "needs ${need[*]} (apt-get install them, or run as root)"; exit 1; }
  say "installing ${need[*]} from Debian"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

tmp=$(mktemp -d)
cid=
cleanup() {
  [ -n "$cid" ] && "${PODMAN[@]}" rm -f "$cid" >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT

has_image() { "${PODMAN[@]}" image exists "$1"; }

# A base image from Debian packages, stored under the name the Dockerfile pulls.
assemble() {
  local name=$1 variant=$2 include=$3
  shift 3
  say "assembling $name from Debian $SUITE ($variant: $include)"
  # Local CAs (an egress proxy's, say) are trusted inside too, as on this machine.
  mmdebstrap --quiet --variant="$variant" --include="$include" "$@" \
    --customize-hook='for c in /usr/local/share/ca-certificates/*.crt; do
        [ -e "$c" ] && cp "$c" "$1/usr/local/share/ca-certificates/"; done
      chroot "$1" update-ca-certificates >/dev/null' \
    "$SUITE" "$tmp/rootfs.tar" "$MIRROR"
  "${PODMAN[@]}" import --quiet \
    --change 'ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'CMD ["bash"]' "$tmp/rootfs.tar" "$name" >/dev/null
  rm -f "$tmp/rootfs.tar"
}

if ! has_image docker.io/library/debian:bookworm-slim; then
  assemble docker.io/library/debian:bookworm-slim minbase ca-certificates
fi
if ! has_image "docker.io/library/rust:$RUST_VERSION-bookworm"; then
  sysroot=$(rustc --print sysroot)
  case "$(rustc --version)" in
    "rustc $RUST_VERSION".*) ;;
    *) say "the local toolchain is $(rustc --version), not $RUST_VERSION"; exit 1 ;;
  esac
  assemble "docker.io/library/rust:$RUST_VERSION-bookworm" buildd \
    ca-certificates,python3-pip,pkg-config,git \
    --customize-hook="cp -a '$sysroot' \"\$1/usr/local/rust\""
fi

say "building $IMAGE"
start=$(date +%s)
"${PODMAN[@]}" build --pull=never --format docker "${LIMITS[@]}" --target "$TARGET" -t "$IMAGE" . >"$tmp/build.log" 2>&1 \
  || { tail -40 "$tmp/build.log" >&2; say "build failed"; exit 1; }
say "built in $(( $(date +%s) - start )) s: $("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE") bytes"

user=$("${PODMAN[@]}" image inspect --format '{{.Config.User}}' "$IMAGE")
[ "$user" = 10001 ] || { say "image user is '$user', expected 10001"; exit 1; }

# (--health-interval=disable: no systemd timer here; `healthcheck run` below runs it once.)
if [ "$TARGET" = gpu ]; then
  log=$("${PODMAN[@]}" run --rm "${LIMITS[@]}" --read-only --cap-drop=ALL --health-interval=disable \
    --security-opt no-new-privileges --env FLOWSERVE_LOG_FORMAT=text --env RUST_LOG=warn \
    --entrypoint timeout "$IMAGE" 20 /usr/local/bin/flowserve 2>&1 || true)
  refused=$(grep -c 'package refused' <<<"$log" || true)
  # The driver's libcuda.so.1 is the one library the image must not carry (the host's, or the
  # NVIDIA container toolkit's); any other missing library is a packaging fault.
  if [ "$refused" -lt 1 ] || grep 'cannot open shared object file' <<<"$log" | grep -vq 'libcuda\.so\.1:'; then
    echo "$log" | tail -20 >&2
    say "the GPU image did not refuse its models for want of a GPU alone"
    exit 1
  fi
  why=$(grep -m1 'package refused' <<<"$log" | sed 's/.*with error: //' | cut -c1-300)
  say "GPU image: $refused packages refused without a GPU, for this reason: $why"
  "${PODMAN[@]}" image prune -f >/dev/null 2>&1 || true
  say "passed"
  exit 0
fi

cid=$("${PODMAN[@]}" run -d "${LIMITS[@]}" --read-only --cap-drop=ALL --health-interval=disable \
  --security-opt no-new-privileges -p "127.0.0.1:$PORT:8080" "$IMAGE" 2>"$tmp/run.err") \
  || { cat "$tmp/run.err" >&2; say "podman run failed"; exit 1; }
ready=
for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null 2>&1; then ready=1; break; fi
  sleep 0.5
done
if [ -z "$ready" ]; then
  "${PODMAN[@]}" logs "$cid" 2>&1 | tail -20 >&2
  say "the container never became ready"
  exit 1
fi
say "ready on /v2/health/ready as uid $("${PODMAN[@]}" exec "$cid" id -u), root filesystem read-only"

body=$(curl -fsS "http://127.0.0.1:$PORT/log_prob" -H 'content-type: application/json' \
  -d '{"model":"moons","inputs":[[0.5,0.25]]}')
case "$body" in
  *'"log_prob"'*) say "POST /log_prob: $body" ;;
  *) say "unexpected /log_prob answer: $body"; exit 1 ;;
esac

"${PODMAN[@]}" healthcheck run "$cid" >/dev/null || { say "HEALTHCHECK failed"; exit 1; }
say "HEALTHCHECK (flowserve healthcheck) healthy"
if "${PODMAN[@]}" exec "$cid" touch /usr/local/bin/x 2>/dev/null; then
  say "the root filesystem is writable"; exit 1
fi
# Earlier builds' intermediate images would pile up (2 GB each); the cargo caches stay.
"${PODMAN[@]}" image prune -f >/dev/null 2>&1 || true
say "passed"
