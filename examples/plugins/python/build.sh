#!/usr/bin/env bash
# Builds the Python example into OUT (default: py-relay.wasm here) with componentize-py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/py-relay.wasm}"
componentize-py -d "$here/../../../wit/v0.1.0" -w aggregator componentize -p "$here" app -o "$out"
