#!/usr/bin/env bash
# Quick start, command 2: set up .venv if needed, then run the test suite.
# Extra arguments go to pytest, e.g. ./test.sh -m "not slow" or ./test.sh tests/unit.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup-venv.sh
exec .venv/bin/pytest "$@"
