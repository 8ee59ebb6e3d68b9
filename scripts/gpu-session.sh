#!/usr/bin/env bash
# The GPU checks of issues 15-17, prepared here and run as two commands on a lent GPU machine.
#
# A lent machine is bare (its Python packages: scripts/gpu-machine-packages.txt, torch, numpy,
# scipy, scikit-image, tifffile among them; no zarr, dask, jsonschema or snakemake; no network),
# each command may run 10 minutes and a session has 15 minutes of device time in all, start-up
# included. So everything is fetched here, travels with the checkout and is run stage by stage
# there, without snakemake:
#
#   here:   bash scripts/gpu-session.sh prepare   # gate, then wheels -> .whl/, ISBI data and the stage list -> .gpu/
#           (run it with the project's venv: it calls its pip and snakemake)
#   here:   bash scripts/gpu-session.sh gate      # gpu_check.py imported with only the machine's packages
#           and the carried wheels (scripts/gpu_import_gate.py; a missing one is named, exit 1)
#   here:   bash scripts/gpu-session.sh --dry-run # the same steps on the CPU with tiny settings (~1-2 min):
#           prepare (this Python's wheels, rebuilt offline), check --quick and a tiny isbi, every
#           `unet` stage and gpu_check.py under the import gate; tests/unit/test_gpu_session.py runs it
#   there:  bash scripts/gpu-session.sh check     # command 1: benchmarks/gpu_check.py -> $OUT/gpu_check.md (~8 min)
#   there:  bash scripts/gpu-session.sh isbi      # command 2: config/isbi2012.yaml + scripts/gpu-session-isbi.yaml
#           (3500 iterations, so it fits 10 min) stage by stage, timed -> $OUT/times.txt, scores
#
# With the device tool: run(command="bash scripts/gpu-session.sh check", carry=[".whl", ".gpu"],
# timeout_s=600), then the same with "isbi"; `prepare` lists both folders in .git/info/exclude and
# refuses more than the 64 MiB that may travel. There, `install` (run by both) puts the wheels in
# /tmp/site and a `unet` command (unet_core.cli.main, as the console script) in /tmp/bin. Rows are
# printed (and logged to $OUT) as they are measured, so a run stopped at its limit still returns
# what it measured. The rows, scores and times go into benchmarks/RESULTS.md with the date and the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# the workflow the `isbi` step runs, later files win (config/config.yaml instead: a CPU smoke test)
CONFIGS=(${CONFIG:-config/isbi2012.yaml scripts/gpu-session-isbi.yaml})
OUT=${OUT:-/tmp/gpu-session-out}
# the GPU machine's Python packages (distribution names), kept up to date by hand
MACHINE_PACKAGES=scripts/gpu-machine-packages.txt
# what zarr, dask and the MONAI comparison need beyond $MACHINE_PACKAGES; `prepare`
# pins each to the development venv's version where the venv has it (stores must read the same)
PACKAGES=(zarr numcodecs donfig google-crc32c dask distributed partd locket zict tblib tornado msgspec monai)
ISBI=${ISBI:-../shared/datasets/isbi2012}
WHL=${WHL:-.whl}          # the wheels that travel (carry)
GPU_DIR=${GPU_DIR:-.gpu}  # the ISBI data and the stage list that travel (carry)
SITE=${SITE:-/tmp/site}   # there: where `install` puts the wheels
BIN=${BIN:-/tmp/bin}      # there: where `install` puts the `unet` command
SAMPLES=${SAMPLES:-}      # a samples table instead of the configs' (the dry run's few slices)
DRY=                      # set by --dry-run: this Python's wheels, --quick, every stage gated
GATE=(--machine "$MACHINE_PACKAGES" --carried "${PACKAGES[@]}")

gate() {  # here: would gpu_check.py import there? (PYTHON: the interpreter; default the venv's)
    # GATE_RUN=1: also run its --quick CPU rows under the gate (about 30 s), lazy imports included
    "${PYTHON:-.venv/bin/python}" scripts/gpu_import_gate.py benchmarks/gpu_check.py \
        ${GATE_RUN:+"--run=--quick --device cpu ${GATE_RUN_ARGS:-}"} "${GATE[@]}"
}

prepare() {
    gate
    if [ -z "$DRY" ]; then
        local exclude && exclude=$(git rev-parse --git-path info/exclude)
        mkdir -p "$(dirname "$exclude")"
        for ignored in "/$WHL/" "/$GPU_DIR/"; do
            grep -qxF "$ignored" "$exclude" 2>/dev/null || echo "$ignored" >>"$exclude"
        done
    fi
    rm -rf "$WHL" "$GPU_DIR" && mkdir -p "$WHL" "$GPU_DIR"
    if [ -n "$DRY" ]; then  # offline: the venv's own installed files, as wheels for this Python
        .venv/bin/python scripts/repack_wheels.py "$WHL" "${PACKAGES[@]}" >/dev/null
    else
        local pinned
        pinned=$(.venv/bin/python -c "import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f'{name}=={version(name)}')
    except PackageNotFoundError:
        print(name)" "${PACKAGES[@]}")
        # shellcheck disable=SC2086  # one requirement per word
        .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
            -d "$WHL" $pinned
    fi
    cp -r "$ISBI" "$GPU_DIR/isbi2012"
    # the workflow's own commands, in an order that respects their inputs
    .venv/bin/snakemake -n -p --cores 16 --configfile "${CONFIGS[@]}" \
        --config output_dir="$GPU_DIR/results" ${SAMPLES:+samples="$SAMPLES"} \
        | sed -n 's/^Shell command: //p' | grep '^unet ' | sed "s#$ISBI/#$GPU_DIR/isbi2012/#g" >"$GPU_DIR/isbi_stages.sh"
    [ -s "$GPU_DIR/isbi_stages.sh" ] || { echo "prepare: snakemake -n listed no stage"; exit 1; }
    local mib
    mib=$(( ($(du -sb "$WHL" "$GPU_DIR" | awk '{s += $1} END {print s}') \
             + $(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)) / 1048576 ))
    echo "prepared: $(ls "$WHL" | wc -l) wheels, $(wc -l <"$GPU_DIR/isbi_stages.sh") stages; $mib MiB travel with the checkout (limit 64 MiB)"
    [ -n "$DRY" ] || [ "$mib" -le 64 ] || { echo "prepare: more than the device tool's 64 MiB would travel"; exit 1; }
}

install() {  # on the GPU machine: the wheels into $SITE, and a `unet` command in $BIN
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl
    mkdir -p "$BIN" "$OUT"
    if [ -n "$DRY" ]; then  # every stage sees only the machine's packages and the carried wheels
        printf '#!/bin/sh\nexec %q %q --module unet_core.cli %s -- "$@"\n' "$PY" "$PWD/scripts/gpu_import_gate.py" \
            "$(printf '%q ' "${GATE[@]/#$MACHINE_PACKAGES/$PWD/$MACHINE_PACKAGES}")" >"$BIN/unet"
    else  # what the console script does: unet_core.cli.main
        printf '#!/bin/sh\nexec %q -m unet_core "$@"\n' "$PY" >"$BIN/unet"
    fi
    chmod +x "$BIN/unet"
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$BIN:$PATH" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    "$PY" -c "import torch, zarr, dask; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'zarr', zarr.__version__, 'from', zarr.__file__)"
    echo "unet: $(command -v unet), $(unet --version)"
}

check() {  # command 1: the inference, training and MONAI table of issues 15 and 16
    install
    if [ -n "$DRY" ]; then
        "$PY" scripts/gpu_import_gate.py benchmarks/gpu_check.py "${GATE[@]}" -- \
            --quick --device cpu --repeats 1 --markdown "$OUT/gpu_check.md"  # medians: test_benchmarks.py
    else
        "$PY" benchmarks/gpu_check.py --markdown "$OUT/gpu_check.md"
    fi 2>&1 | tee "$OUT/gpu_check.log"
}

isbi() {  # command 2: issue 16's time to accuracy, TIFF to evaluate, each stage timed
    install
    rm -rf "$GPU_DIR/results"
    local start=$SECONDS
    while IFS= read -r stage; do
        local log=${stage##*> } && log=${log%% 2>&1}
        mkdir -p "$(dirname "$log")"
        local t0=$SECONDS
        bash -c "$stage" || { echo "FAILED: $stage"; tail -n 20 "$log"; exit 1; }
        echo "$(( SECONDS - t0 )) s  $(cut -c1-110 <<<"$stage")" | tee -a "$OUT/times.txt"
    done <"$GPU_DIR/isbi_stages.sh"
    echo "whole workflow: $(( SECONDS - start )) s" | tee -a "$OUT/times.txt"
    cp "$GPU_DIR/results/model/metrics.csv" "$OUT/train_metrics.csv"
    for m in "$GPU_DIR"/results/*/evaluate/metrics.json; do
        local sample && sample=$(basename "$(dirname "$(dirname "$m")")")
        cp "$m" "$OUT/$sample-metrics.json"
        "$PY" -c "import json, sys; m = json.load(open(sys.argv[1]))['dataset']; \
print(sys.argv[2], {k: round(m[k], 4) for k in ('pixel_error', 'rand_error_fg', 'adapted_rand_error', 'warping_error')})" \
            "$m" "$sample" | tee -a "$OUT/scores.txt"
    done
}

dry_run() {  # here: prepare, check and isbi on the CPU, tiny, in a scratch folder (DRY_DIR, default mktemp)
    if [ ! -f "$ISBI/train-volume.tif" ] || [ ! -f "$ISBI/train-labels.tif" ]; then
        echo "gpu-session --dry-run: skipped: no ISBI 2012 data at $ISBI (train-volume.tif, train-labels.tif; set ISBI=)"
        return 0
    fi
    DRY=1
    local dir=${DRY_DIR:-$(mktemp -d)}
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    WHL=$dir/whl GPU_DIR=$dir/gpu OUT=$dir/out SITE=$dir/site BIN=$dir/bin SAMPLES=$dir/samples.tsv
    PY=${PYTHON:-$PWD/.venv/bin/python}
    CONFIGS+=(scripts/gpu-session-dry-run.yaml)
    # dask imports the importlib-metadata backport (+ its lazy-importer) below Python 3.12 (the machine
    # has 3.12: not carried there)
    if "$PY" -c 'import sys; sys.exit(sys.version_info >= (3, 12))'; then
        PACKAGES+=(importlib-metadata lazy-importer)
        GATE=(--machine "$MACHINE_PACKAGES" --carried "${PACKAGES[@]}")
    fi
    { printf 'name\timage\tlabels\tslices\trole\n'
      for row in "isbi_train 0-1 train" "isbi_val 2 val" "isbi_test 3 predict"; do
          set -- $row
          printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$ISBI/train-volume.tif" "$ISBI/train-labels.tif" "$2" "$3"
      done; } >"$SAMPLES"
    local start=$SECONDS
    prepare
    (check)  # each in its own shell, as each is its own command there
    (isbi)
    echo "gpu-session --dry-run: passed in $(( SECONDS - start )) s (prepare, check, isbi); outputs in $OUT"
}

case "${1:-}" in
    gate | prepare | check | isbi) "$1" ;;
    --dry-run) dry_run ;;
    *) sed -n '2,${/^#/!q;p}' "$0"; exit 2 ;;
esac
