#!/usr/bin/env bash
# Lints and format-checks the tree with ruff (pyproject.toml), then runs the test suite on CPU
# (multi-device tests fake 4-8 CPU devices themselves).
# By default the @pytest.mark.slow end-to-end tests are skipped; CI (CI=true) or
# DETCON_TEST_ALL=1 runs everything. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${DETCON_VENV:-$PWD/.venv}"
export JAX_PLATFORMS=cpu
export TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/ruff" check --quiet . || { echo "ruff check failed: run '$VENV/bin/ruff check --fix .'" >&2; exit 1; }
"$VENV/bin/ruff" format --check --quiet . || { echo "ruff format failed: run '$VENV/bin/ruff format .'" >&2; exit 1; }
select=(-m "not slow")
if [ "${CI:-}" = "true" ] || [ "${DETCON_TEST_ALL:-0}" = "1" ]; then
  select=()
fi
exec "$VENV/bin/python" -m pytest -q -ra --durations=15 "${select[@]}" "$@"
