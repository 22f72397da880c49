#!/usr/bin/env bash
# Fetches promtool (for `promtool check rules` and `promtool test rules` in the tests) from
# Debian's prometheus package, pinned by version and sha256, and unpacks it into DEST
# without installing anything system-wide. Only apt talks to the network.
set -euo pipefail
DEST=${1:-.tools}
VERSION=2.42.0+ds-5+b6
SHA256=3b0e0255b059a7696bd4a139a4a4eb24d71df067936a61ece5093559cbc7991c
[ -x "$DEST/promtool" ] && exit 0
command -v apt-get >/dev/null || { echo "fetch-promtool: needs apt (Debian)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! apt-cache show "prometheus=$VERSION" >/dev/null 2>&1; then
  apt-get update -qq || { echo "fetch-promtool: apt-get update failed (run as root, or install prometheus $VERSION)" >&2; exit 1; }
fi
(cd "$tmp" && apt-get download -qq "prometheus=$VERSION" 2>/dev/null)
deb=$(ls "$tmp"/prometheus_*.deb)
got=$(sha256sum "$deb" | cut -d' ' -f1)
if [ "$got" != "$SHA256" ]; then
  echo "fetch-promtool: $deb has sha256 $got, expected $SHA256; refusing it" >&2
  exit 1
fi
dpkg-deb -x "$deb" "$tmp/x"
mkdir -p "$DEST"
cp "$tmp/x/usr/bin/promtool" "$DEST/promtool"
echo "fetch-promtool: $("$DEST/promtool" --version 2>&1 | head -1) in $DEST"
