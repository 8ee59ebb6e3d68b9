#!/usr/bin/env bash
# The GPU checks of issues 15-17, prepared here and run as one command on a lent GPU machine.
#
# A lent machine is bare (its Python packages: scripts/gpu-machine-packages.txt, torch, numpy,
# scipy, scikit-image, tifffile among them; no zarr, dask, jsonschema or snakemake; no network),
# each command may run 10 minutes and a session has 15 minutes of device
# time in all, start-up included. So everything is fetched here, travels with the checkout and is
# run stage by stage there, without snakemake:
#
#   here:   bash scripts/gpu-session.sh prepare   # gate, then wheels -> .whl/, ISBI data and the stage list -> .gpu/
#           (run it with the project's venv: it calls its pip and snakemake)
#   here:   bash scripts/gpu-session.sh gate      # gpu_check.py imported with only the machine's packages
#           and the carried wheels (scripts/gpu_import_gate.py; a missing one is named, exit 1)
#   there:  bash scripts/gpu-session.sh check     # benchmarks/gpu_check.py -> $OUT/gpu_check.md (~8 min)
#   there:  bash scripts/gpu-session.sh isbi      # config/isbi2012.yaml stage by stage, timed -> $OUT
#
# With the device tool: run(command="bash scripts/gpu-session.sh check", carry=[".whl", ".gpu"],
# timeout_s=600); `prepare` lists both folders in .git/info/exclude. Rows are printed (and logged
# to $OUT) as they are measured, so a run stopped at its limit still returns what it measured.
# The rows, scores and times go into benchmarks/RESULTS.md with the date and the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONFIG=${CONFIG:-config/isbi2012.yaml}  # the workflow the `isbi` step runs (config/config.yaml: a CPU smoke test)
OUT=${OUT:-/tmp/gpu-session-out}
# the GPU machine's Python packages (distribution names), kept up to date by hand
MACHINE_PACKAGES=scripts/gpu-machine-packages.txt
# what zarr, dask and the MONAI comparison need beyond $MACHINE_PACKAGES; `prepare`
# pins each to the development venv's version where the venv has it (stores must read the same)
PACKAGES=(zarr numcodecs donfig google-crc32c dask distributed partd locket zict tblib tornado msgspec monai)
ISBI=${ISBI:-../shared/datasets/isbi2012}

gate() {  # here: would gpu_check.py import there? (PYTHON: the interpreter; default the venv's)
    # GATE_RUN=1: also run its --quick CPU rows under the gate (about 30 s), lazy imports included
    "${PYTHON:-.venv/bin/python}" scripts/gpu_import_gate.py benchmarks/gpu_check.py --machine "$MACHINE_PACKAGES" \
        ${GATE_RUN:+"--run=--quick --device cpu ${GATE_RUN_ARGS:-}"} --carried "${PACKAGES[@]}"
}

prepare() {
    gate
    local exclude && exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    for ignored in /.whl/ /.gpu/; do
        grep -qxF "$ignored" "$exclude" 2>/dev/null || echo "$ignored" >>"$exclude"
    done
    rm -rf .whl .gpu && mkdir -p .whl .gpu
    local pinned
    pinned=$(.venv/bin/python -c "import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f'{name}=={version(name)}')
    except PackageNotFoundError:
        print(name)" "${PACKAGES[@]}")
    # shellcheck disable=SC2086  # one requirement per word
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pinned
    cp -r "$ISBI" .gpu/isbi2012
    # the workflow's own commands, in an order that respects their inputs
    .venv/bin/snakemake -n -p --cores 16 --configfile "$CONFIG" --config output_dir=.gpu/results \
        | sed -n 's/^Shell command: //p' | grep '^unet ' | sed "s#$ISBI/#.gpu/isbi2012/#g" >.gpu/isbi_stages.sh
    echo "prepared: $(ls .whl | wc -l) wheels, $(wc -l <.gpu/isbi_stages.sh) stages, $(du -sh .whl .gpu | awk '{print $1}' | paste -sd+) (limit 64 MiB)"
}

install() {  # on the GPU machine: the wheels into /tmp/site, and a `unet` command
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    mkdir -p /tmp/bin "$OUT"
    printf '#!/bin/sh\nexec %s -m unet_core "$@"\n' "$PY" >/tmp/bin/unet
    chmod +x /tmp/bin/unet
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/bin:$PATH" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c "import torch, zarr, dask; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'zarr', zarr.__version__)"
}

check() {
    install
    "$PY" benchmarks/gpu_check.py --markdown "$OUT/gpu_check.md" ${QUICK:+--quick --device cpu} 2>&1 | tee "$OUT/gpu_check.log"
}

isbi() {  # issue 16's time to accuracy: TIFF to evaluate, each stage timed
    install
    rm -rf .gpu/results
    local start=$SECONDS
    while IFS= read -r stage; do
        local log=${stage##*> } && log=${log%% 2>&1}
        mkdir -p "$(dirname "$log")"
        local t0=$SECONDS
        bash -c "$stage" || { echo "FAILED: $stage"; tail -n 20 "$log"; exit 1; }
        echo "$(( SECONDS - t0 )) s  $(cut -c1-110 <<<"$stage")" | tee -a "$OUT/times.txt"
    done <.gpu/isbi_stages.sh
    echo "whole workflow: $(( SECONDS - start )) s" | tee -a "$OUT/times.txt"
    cp .gpu/results/model/metrics.csv "$OUT/train_metrics.csv"
    for m in .gpu/results/*/evaluate/metrics.json; do
        local sample=$(basename "$(dirname "$(dirname "$m")")")
        cp "$m" "$OUT/$sample-metrics.json"
        "$PY" -c "import json; m = json.load(open('$m'))['dataset']; \
print('$sample', {k: round(m[k], 4) for k in ('pixel_error', 'rand_error_fg', 'adapted_rand_error', 'warping_error')})"
    done
}

case "${1:-}" in
    gate | prepare | check | isbi) "$1" ;;
    *) sed -n '2,${/^#/!q;p}' "$0"; exit 2 ;;
esac
