#!/usr/bin/env bash
# Runs the whole test suite on CPU (multi-device tests fake 4-8 CPU devices themselves).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${DETCON_VENV:-$PWD/.venv}"
export JAX_PLATFORMS=cpu
export TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" -m pytest -q -ra "$@"
