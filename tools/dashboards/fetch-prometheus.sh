#!/usr/bin/env bash
# Fetch Debian's `prometheus` package (prometheus and promtool) and unpack it under
# DEST (default .cache/prometheus) without installing anything system-wide:
#   apt-get download  -> the .deb into .cache/apt (no root needed)
#   dpkg-deb -x       -> DEST/usr/bin/{prometheus,promtool}
# A fresh machine may have no package lists yet: as root we run `apt-get update`
# once; otherwise we say what to run. Used by `make prometheus` and by the
# monitoring tests when the binaries are missing.
set -euo pipefail
dest="${1:-.cache/prometheus}"
cache="$(dirname "$dest")/apt"
if [ -x "$dest/usr/bin/prometheus" ] && [ -x "$dest/usr/bin/promtool" ]; then
  exit 0
fi
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
  echo "error: apt-get and dpkg-deb are needed to fetch Debian's prometheus package" >&2; exit 1; }
mkdir -p "$cache"
download() { (cd "$cache" && apt-get download -q prometheus >/dev/null); }
if ! download 2>/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "apt has no package list for prometheus yet; running apt-get update" >&2
    apt-get update -qq
    download
  else
    echo "error: apt cannot find the prometheus package (no package lists yet?)." >&2
    echo "Run 'sudo apt-get update' once, then run make again." >&2
    exit 1
  fi
fi
deb="$(ls -t "$cache"/prometheus_*.deb | head -n1)"
rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
dpkg-deb -x "$deb" "$dest.tmp"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
"$dest/usr/bin/promtool" --version 2>&1 | head -n1
