#!/bin/sh
# Install the pinned opencode-ai from npm into a cache folder (once; reused across runs).
# With --path: print where its executable is (installed or not) and do nothing else.
set -eu
version="${OPENCODE_VERSION:-1.18.33}"
cache="${OPENCODE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/opencoderouter/opencode-ai-$version}"
if [ "${1:-}" = --path ]; then
    echo "$cache/bin/opencode"
    exit 0
fi
if [ -x "$cache/bin/opencode" ] && "$cache/bin/opencode" --version >/dev/null 2>&1; then
    exit 0
fi
mkdir -p "$cache"
echo "installing opencode-ai@$version into $cache"
(cd "$cache" && npm install --silent --no-audit --no-fund --ignore-scripts "opencode-ai@$version" >/dev/null)
# The .bin shim is a placeholder replaced by a postinstall script; call the platform binary.
arch=x64
[ "$(uname -m)" = aarch64 ] && arch=arm64
binary="$cache/node_modules/opencode-linux-$arch/bin/opencode"
if ! grep -q avx2 /proc/cpuinfo 2>/dev/null && [ -x "$cache/node_modules/opencode-linux-$arch-baseline/bin/opencode" ]; then
    binary="$cache/node_modules/opencode-linux-$arch-baseline/bin/opencode"
fi
mkdir -p "$cache/bin"
ln -sf "$binary" "$cache/bin/opencode"
"$cache/bin/opencode" --version
