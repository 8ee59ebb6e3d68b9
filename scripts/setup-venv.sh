#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install everything.
# Idempotent: does nothing when .venv already matches pyproject.toml.
#   UNET_VENV=path   use another venv location
#   PYTHON=python3.12  use another interpreter (>= 3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${UNET_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.unet-installed"
want="$(cat pyproject.toml scripts/setup-venv.sh | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: error: $PYTHON is missing or older than Python 3.11; install Python >= 3.11 or set PYTHON=..." >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV" >&2
  if ! "$PYTHON" -m venv "$VENV"; then
    echo "setup: error: '$PYTHON -m venv' failed; on Debian/Ubuntu run: sudo apt-get install python3-venv" >&2
    exit 2
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
# PyTorch first, pinned: the CPU wheel where no CUDA build is offered, the CUDA build on Linux x86_64.
# pyproject.toml only asks for torch>=2.4, so an existing torch is kept by the next step.
"${PIP[@]}" install -q "torch==2.13.0"
"${PIP[@]}" install -q -e ".[test,bioimageio]"
echo "$want" > "$STAMP"
echo "setup: environment ready in $VENV" >&2
