#!/usr/bin/env bash
# Creates a virtualenv (default .venv, override with DETCON_VENV) and installs requirements.txt.
# Idempotent: a second run only checks that the pinned set is already satisfied.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${DETCON_VENV:-$PWD/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv at $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

stamp="$VENV/.detcon-requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] requirements already installed in $VENV"
else
  echo "[setup] installing requirements.txt into $VENV"
  "${PIP[@]}" install --quiet --upgrade pip
  "${PIP[@]}" install --quiet -r requirements.txt
  # Optional: a CPU build of PyTorch enables the numerical export test. PyPI hosts no '+cpu'
  # build, so this succeeds only where one is reachable (a local wheel folder in PIP_FIND_LINKS,
  # or --extra-index-url of PyTorch's CPU index); otherwise the test is skipped with a reason.
  if [ "${DETCON_SKIP_TORCH:-0}" != 1 ]; then
    "${PIP[@]}" install --quiet --only-binary=:all: "torch==2.13.0+cpu" 2>/dev/null \
      && echo "[setup] installed optional torch (CPU)" \
      || echo "[setup] optional torch CPU build not reachable: export test against PyTorch will be skipped"
  fi
  # Optional: OpenCV's contrib build, to compare our region priors with its selective search
  # (scripts/compare_region_priors.py, tests/test_region_priors.py); skipped with a reason if absent.
  if [ "${DETCON_SKIP_OPENCV:-0}" != 1 ]; then
    "${PIP[@]}" install --quiet --only-binary=:all: "opencv-contrib-python-headless==5.1.0.95" 2>/dev/null \
      && echo "[setup] installed optional opencv-contrib-python-headless" \
      || echo "[setup] optional opencv-contrib-python-headless not reachable: OpenCV comparisons will be skipped"
  fi
  "${PIP[@]}" install --quiet --no-deps -e . 
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import jax, haiku, optax, tensorflow, detcon; print('[setup] ok: jax', jax.__version__, 'on', jax.default_backend())" 2>/dev/null
