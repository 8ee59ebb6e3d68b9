#!/usr/bin/env bash
# Quick start, command 1: set up .venv if needed, then run the whole workflow on the
# embedded synthetic sample (config/config.yaml). Extra arguments go to snakemake,
# e.g. ./run.sh -n (dry run) or ./run.sh --configfile config/isbi2012.yaml.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup-venv.sh
export PATH="$PWD/.venv/bin:$PATH"  # jobs call the `unet` CLI of this environment
exec snakemake --cores all "$@"
