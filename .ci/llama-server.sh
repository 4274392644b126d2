#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (CPU only) for the remote-backend tests, from the llama.cpp
# vendored in the llama-cpp-python sdist, into a cache outside any clone keyed by version.
# Prints the binary's path. Does nothing when the cached binary exists.
set -euo pipefail

VERSION=0.3.36
# The cache folder: the version and how it is built (`-noamx`: see the flags below).
CACHE_KEY=0.3.36-noamx
CACHE="${STAIRCASE_CACHE:-$HOME/.cache/staircase}/llama-server/$CACHE_KEY"
BIN="$CACHE/bin/llama-server"
if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi

# The build needs cmake and a C++ compiler (`cargo xtask test` installs them first; run by hand, this does).
if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ make >&2
  else
    echo "llama-server.sh: needs cmake and a C++ compiler (apt-get install cmake g++ make)" >&2
    exit 1
  fi
fi

SDIST="llama_cpp_python-$VERSION.tar.gz"
WORK="$CACHE/work"
mkdir -p "$WORK"
if [ ! -f "$WORK/$SDIST" ]; then
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$WORK" >&2
fi
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -d "$SRC" ] || tar -xzf "$WORK/$SDIST" -C "$WORK"

JOBS="${LLAMA_SERVER_JOBS:-2}"
# Native kernels but no AMX: on an AMX-capable Xeon under a hypervisor that does not grant the
# tile state, ggml's AMX repacking dies with an illegal instruction at the first matmul (the
# same flags as the host's build, in .cargo/config.toml).
if [ "$(uname -m)" = x86_64 ]; then
  export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
# Minimal: no curl (models are local files), no tests/examples, native CPU kernels.
nice -n 15 cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >&2
nice -n 15 cmake --build "$WORK/build" --target llama-server -j "$JOBS" >&2

mkdir -p "$CACHE/bin"
cp "$WORK/build/bin/llama-server" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
rm -rf "$WORK"
echo "$BIN"
