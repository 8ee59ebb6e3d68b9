#!/usr/bin/env bash
# Stop the private SLURM cluster started by tests/slurm/start_local_slurm.sh.
#
#   bash tests/slurm/stop_local_slurm.sh            # keep $UNET_SLURM_DIR/log for reading
#   bash tests/slurm/stop_local_slurm.sh --purge    # also delete the logs (whole state dir)
#
# It cancels this cluster's remaining jobs with scancel, then signals ONLY the PIDs recorded
# in $UNET_SLURM_DIR/pids (and only while /proc shows them still running the program that was
# recorded, so a reused PID is never touched): slurmd, then slurmctld, then munged. SIGTERM
# first, SIGKILL after a bounded wait. Never pkill/killall. Every wait has a timeout.
set -euo pipefail

DIR="${UNET_SLURM_DIR:-/tmp/unet-slurm}"
TIMEOUT_S="${UNET_SLURM_TIMEOUT_S:-20}"
PURGE=0
[[ "${1:-}" == "--purge" ]] && PURGE=1

log() { echo "stop_local_slurm: $*" >&2; }
export PATH="$PATH:/usr/sbin:/sbin"

alive() {
    [[ -r "/proc/$1/cmdline" ]] || return 1
    local argv0
    argv0="$(tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | head -n1)"
    [[ "$(basename "$argv0")" == "$2" ]]
}

if [[ ! -s "$DIR/pids" ]]; then
    log "no PID file in $DIR: nothing to stop"
else
    # Jobs first, through SLURM itself (their slurmstepd processes are not ours to kill).
    if [[ -r "$DIR/slurm.conf" ]] && command -v scancel >/dev/null 2>&1; then
        export SLURM_CONF="$DIR/slurm.conf"
        if timeout 10 squeue -h -o '%i' 2>/dev/null | grep -q .; then
            log "cancelling remaining jobs"
            timeout 10 scancel --full --user="$(id -un)" 2>/dev/null || true
            deadline=$((SECONDS + TIMEOUT_S))
            while timeout 5 squeue -h -t RUNNING,PENDING,COMPLETING -o '%i' 2>/dev/null | grep -q . \
                && ((SECONDS < deadline)); do
                sleep 0.5
            done
        fi
    fi
    # Reverse start order: slurmd, slurmctld, munged.
    mapfile -t entries < <(tac "$DIR/pids")
    for entry in "${entries[@]}"; do
        read -r pid exe <<<"$entry"
        if ! alive "$pid" "$exe"; then
            log "$exe (pid $pid) is not running"
            continue
        fi
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + TIMEOUT_S))
        while alive "$pid" "$exe" && ((SECONDS < deadline)); do sleep 0.2; done
        if alive "$pid" "$exe"; then
            log "$exe (pid $pid) ignored SIGTERM for ${TIMEOUT_S}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            deadline=$((SECONDS + 5))
            while alive "$pid" "$exe" && ((SECONDS < deadline)); do sleep 0.2; done
        fi
        # Reap the zombie if the daemon was a child of this shell (it normally is not).
        if alive "$pid" "$exe"; then
            log "$exe (pid $pid) is still running after SIGKILL"
        else
            log "stopped $exe (pid $pid)"
        fi
    done
    rm -f "$DIR/pids"
fi

# The /etc/slurm/slurm.conf symlink start_local_slurm.sh made (only if it still points to us).
if [[ -s "$DIR/etc-link" ]]; then
    link="$(cat "$DIR/etc-link")"
    if [[ -L "$link" && "$(readlink "$link")" == "$DIR/slurm.conf" ]]; then
        rm -f "$link"
    fi
    rm -f "$DIR/etc-link"
fi

# Clean up runtime state; keep the logs unless --purge.
if [[ -d "$DIR" ]]; then
    if ((PURGE)); then
        rm -rf "$DIR"
    else
        rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/munge/munge.socket"*
    fi
fi
exit 0
