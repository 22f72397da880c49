#!/usr/bin/env bash
# Fetches the command-line tools the deploy/ checks use from Debian's packages and unpacks them
# into DEST without installing anything system-wide:
#   promtool   (prometheus 2.42.0, bookworm)  `promtool check rules`, `promtool test rules`
#   kustomize  (kustomize 5.6.0, trixie)      renders deploy/overlays/* (a static Go program;
#                                             bookworm has no kustomize package)
# apt runs with its own fresh lists under DEST/apt, so neither root nor the system's sources
# are needed; only apt talks to the network, and only to Debian's mirror. The upstream version
# is pinned; the Debian revision is whichever the suite carries now (a security update replaces
# the old .deb in the archive, so an exact revision would stop resolving), and apt checks the
# package against the suite's signed Release file.
set -euo pipefail
DEST=${1:-.tools}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
# tool  suite  package  upstream-version  path-in-package
TOOLS=(
  "promtool bookworm prometheus 2.42.0 usr/bin/promtool"
  "kustomize trixie kustomize 5.6.0 usr/bin/kustomize"
)

missing=0
for t in "${TOOLS[@]}"; do
  read -r tool _ <<<"$t"
  [ -x "$DEST/$tool" ] || missing=1
done
[ "$missing" = 0 ] && exit 0
command -v apt-get >/dev/null || { echo "fetch-debian-tools: needs apt (Debian)" >&2; exit 1; }

mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
state="$DEST/apt"
mkdir -p "$state/lists/partial" "$state/cache/archives/partial"
: >"$state/status"
printf 'deb %s bookworm main\ndeb %s trixie main\n' "$MIRROR" "$MIRROR" >"$state/sources.list"
APT=(-o "Dir::Etc::SourceList=$state/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$state/lists" -o "Dir::State::Status=$state/status"
  -o "Dir::Cache=$state/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
[ "$(id -u)" = 0 ] || APT+=(-o APT::Sandbox::User="$(id -un)")
apt-get "${APT[@]}" -qq update

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for t in "${TOOLS[@]}"; do
  read -r tool suite package upstream path <<<"$t"
  [ -x "$DEST/$tool" ] && continue
  version=$(apt-cache "${APT[@]}" madison "$package" \
    | awk -F' *[|] *' -v s="$suite/main" -v u="$upstream" \
        'index($3, s) && (index($2, u "+") == 1 || index($2, u "-") == 1) { print $2; exit }')
  [ -n "$version" ] || {
    echo "fetch-debian-tools: Debian $suite has no $package $upstream any more" >&2
    exit 1
  }
  (cd "$tmp" && apt-get "${APT[@]}" -qq download "$package=$version")
  deb=$(ls "$tmp/${package}_"*.deb)
  dpkg-deb -x "$deb" "$tmp/x"
  cp "$tmp/x/$path" "$DEST/$tool"
  echo "fetch-debian-tools: $tool from $package $version (Debian $suite, sha256 $(sha256sum "$deb" | cut -c1-16)...) in $DEST"
  rm -rf "$tmp/x" "$deb"
done
rm -rf "$state"
