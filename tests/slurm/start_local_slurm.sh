#!/usr/bin/env bash
# Start a private one-node SLURM cluster on this machine (for tests/slurm and for trying
# profiles/slurm by hand). Idempotent: running it again while the cluster is up does nothing.
#
#   sudo bash tests/slurm/start_local_slurm.sh        # as root on Debian/Ubuntu
#   export SLURM_CONF=/tmp/unet-slurm/slurm.conf       # what the script prints at the end
#   sinfo; snakemake --workflow-profile profiles/slurm --slurm-status-command squeue
#   bash tests/slurm/stop_local_slurm.sh               # stops only the PIDs recorded here
#
# What it does: installs Debian's munge, slurmctld, slurmd and slurm-client with apt-get if
# they are missing; writes a munge key, slurm.conf (this host's real CPU/memory from
# `slurmd -C`) and all state into a private directory ($UNET_SLURM_DIR, default
# /tmp/unet-slurm), so /etc and any system SLURM are left alone; starts munged ->
# slurmctld -> slurmd by hand (there is no systemd, and apt's policy-rc.d blocks service
# starts), records every PID it started in $UNET_SLURM_DIR/pids, and waits (bounded) until
# `sinfo` shows the node idle.
#
# There is no accounting (no slurmdbd): `sacct` fails on this cluster, so snakemake's SLURM
# executor must be told `--slurm-status-command squeue` (MinJobAge=300 s keeps finished jobs
# visible to squeue long enough). Finished jobs are recorded by the controller in
# $UNET_SLURM_DIR/log/jobcomp.log (jobcomp/filetxt) instead.
#
# Environment (all optional):
#   UNET_SLURM_DIR            state directory                       [/tmp/unet-slurm]
#   UNET_SLURM_CTLD_PORT      slurmctld TCP port                    [6817]
#   UNET_SLURM_SLURMD_PORT    slurmd TCP port                       [6818]
#   UNET_SLURM_TIMEOUT_S      seconds to wait for each step         [60]
#   UNET_SLURM_NO_INSTALL=1   never call apt-get (fail if packages are missing)
set -euo pipefail

DIR="${UNET_SLURM_DIR:-/tmp/unet-slurm}"
CTLD_PORT="${UNET_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${UNET_SLURM_SLURMD_PORT:-6818}"
TIMEOUT_S="${UNET_SLURM_TIMEOUT_S:-60}"
HERE="$(cd "$(dirname "$0")" && pwd)"

log() { echo "start_local_slurm: $*" >&2; }
die() { echo "start_local_slurm: error: $*" >&2; exit 1; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s until it succeeds.
wait_for() {
    local seconds="$1" what="$2"; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${seconds}s waiting for ${what}"
            return 1
        fi
        sleep 0.5
    done
}

# alive PID EXE: the process PID exists and runs the program named EXE (guards PID reuse).
alive() {
    [[ -r "/proc/$1/cmdline" ]] || return 1
    local argv0
    argv0="$(tr '\0' '\n' <"/proc/$1/cmdline" | head -n1)"
    [[ "$(basename "$argv0")" == "$2" ]]
}

cluster_up() {
    [[ -s "$DIR/pids" ]] || return 1
    local pid exe
    while read -r pid exe; do
        alive "$pid" "$exe" || return 1
    done <"$DIR/pids"
    SLURM_CONF="$DIR/slurm.conf" timeout 10 sinfo -h -N -o '%T' 2>/dev/null | grep -qx 'idle\|mixed\|allocated'
}

usage_hint() {
    cat <<EOF
Local SLURM cluster is up (state in $DIR, PIDs in $DIR/pids).
  export SLURM_CONF=$DIR/slurm.conf
  sinfo; squeue
  snakemake --workflow-profile profiles/slurm --slurm-status-command squeue \\
      --set-resources train:gpu=0 predict:gpu=0      # this test node has no GPU and no sacct
  bash $HERE/stop_local_slurm.sh                     # stop it (only the PIDs started here)
EOF
}

# --- 0. already running? ------------------------------------------------------------------
if cluster_up; then
    log "already running"
    usage_hint
    exit 0
fi
if [[ -e "$DIR/pids" ]]; then
    log "found a partly running cluster in $DIR: stopping it first"
    UNET_SLURM_DIR="$DIR" bash "$HERE/stop_local_slurm.sh"
fi

# --- 1. packages --------------------------------------------------------------------------
[[ "$(id -u)" == 0 ]] || die "run as root (the daemons run as root on this private test cluster)"
missing=()
for pair in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [[ -x "/usr/sbin/${pair%%:*}" ]] || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
    [[ "${UNET_SLURM_NO_INSTALL:-0}" != 1 ]] || die "missing packages: ${missing[*]} (UNET_SLURM_NO_INSTALL=1 forbids apt-get)"
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get: install munge and SLURM by hand"
    log "installing ${missing[*]} with apt-get"
    # Hold the dpkg lock for at most 5 minutes; never prompt; policy-rc.d keeps services stopped.
    if ! DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=300 "${missing[@]}" >&2; then
        log "apt-get install failed; trying apt-get update once"
        timeout 300 apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends \
            -o DPkg::Lock::Timeout=300 "${missing[@]}" >&2
    fi
fi
export PATH="$PATH:/usr/sbin:/sbin"

# --- 2. private state directory, munge key, slurm.conf --------------------------------------
mkdir -p "$DIR"/{munge,state,spool,run,log}
chmod 0700 "$DIR" "$DIR/munge"
rm -f "$DIR/pids"
if [[ ! -s "$DIR/munge/munge.key" ]]; then
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="$DIR/munge/munge.key" --force
    else
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
fi
chmod 0600 "$DIR/munge/munge.key"

HOST="$(hostname -s)"
# "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
NODE_HW="$(slurmd -C | head -n1 | sed -e 's/^NodeName=[^ ]* //')"
CPUS="$(sed -n 's/.*\bCPUs=\([0-9]*\).*/\1/p' <<<"$NODE_HW")"
MEM_MB="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE_HW")"
[[ -n "$CPUS" && -n "$MEM_MB" ]] || die "could not read CPUs/RealMemory from 'slurmd -C': $NODE_HW"
# A job without --mem gets DefMemPerCPU per CPU (without it, it would take the whole node
# and every job would run alone).
DEF_MEM=$((MEM_MB / CPUS < 1024 ? MEM_MB / CPUS : 1024))

cat >"$DIR/slurm.conf" <<EOF
# Written by tests/slurm/start_local_slurm.sh: a private one-node test cluster.
ClusterName=unetlocal
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${DIR}/munge/munge.socket
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups/systemd here: plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
DefMemPerCPU=${DEF_MEM}
MailProg=/bin/true
ReturnToService=2
# Finished jobs stay visible to squeue/scontrol for 300 s: snakemake's executor must see
# them when it polls with --slurm-status-command squeue (needs >= 3 x its first-poll delay).
MinJobAge=300
# No slurmdbd: no accounting (sacct fails). Completed jobs are logged here instead.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=${DIR}/log/jobcomp.log
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=${HOST} NodeAddr=127.0.0.1 NodeHostname=${HOST} ${NODE_HW} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$DIR/slurm.conf"

# The job-step side of snakemake's executor (snakemake-executor-plugin-slurm-jobstep 0.6)
# deletes every SLURM_* variable, SLURM_CONF included, before it calls `srun` inside a job,
# so srun only finds a config at the compiled-in path. Point that path at ours, but only if
# nothing is there (never touch a real SLURM installation); stop_local_slurm.sh removes it.
ETC_CONF=/etc/slurm/slurm.conf
if [[ -L "$ETC_CONF" && "$(readlink "$ETC_CONF")" == "$DIR/slurm.conf" ]]; then
    :
elif [[ -e "$ETC_CONF" || -L "$ETC_CONF" ]]; then
    die "$ETC_CONF exists (a real SLURM setup?): jobs would use it; remove it or use another machine"
else
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -s "$DIR/slurm.conf" "$ETC_CONF"
    echo "$ETC_CONF" >"$DIR/etc-link"
fi
: >"$DIR/log/jobcomp.log"   # job ids restart at 1 with a fresh StateSaveLocation

# --- 3. daemons: munged -> slurmctld -> slurmd, each in the foreground of its own session ----
# Started with `setsid CMD &` from this non-interactive shell, so $! is the daemon's own PID
# (no double fork) and the daemon outlives this script. Each PID goes into $DIR/pids at once,
# so stop_local_slurm.sh can clean up even if a later step fails.
start_daemon() {
    local exe="$1"; shift
    setsid "$exe" "$@" </dev/null >>"$DIR/log/$exe.out" 2>&1 &
    local pid=$!
    echo "$pid $exe" >>"$DIR/pids"
    sleep 0.2
    alive "$pid" "$exe" || { tail -n 20 "$DIR/log/$exe.out" "$DIR/log/$exe.log" 2>/dev/null >&2; die "$exe exited at once (log above)"; }
    log "started $exe (pid $pid)"
}
on_exit() {
    local rc=$?
    if ((rc != 0)); then
        log "start failed: stopping what was started; logs in $DIR/log"
        UNET_SLURM_DIR="$DIR" bash "$HERE/stop_local_slurm.sh" || true
    fi
    return "$rc"
}
trap on_exit EXIT

T0=$SECONDS
rm -f "$DIR/munge/munge.socket"*
start_daemon munged --foreground --force \
    --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/run/munged.pid" --seed-file="$DIR/munge/munged.seed" \
    --log-file="$DIR/log/munged.log"
wait_for "$TIMEOUT_S" "munge socket" test -S "$DIR/munge/munge.socket"

start_daemon slurmctld -D -i -f "$DIR/slurm.conf"
wait_for "$TIMEOUT_S" "slurmctld to answer" timeout 5 scontrol ping

start_daemon slurmd -D -f "$DIR/slurm.conf" -N "$HOST"
# ReturnToService=2 brings the node back from an earlier unclean stop; make sure anyway.
node_idle() { timeout 5 sinfo -h -N -n "$HOST" -o '%T' | grep -qx 'idle'; }
if ! wait_for "$TIMEOUT_S" "node $HOST to be idle" node_idle; then
    timeout 5 scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    wait_for 15 "node $HOST to be idle after RESUME" node_idle || {
        timeout 5 sinfo -N -l >&2 || true
        tail -n 30 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
        false
    }
fi
trap - EXIT
log "cluster up in $((SECONDS - T0)) s: node $HOST, $CPUS CPUs, $MEM_MB MB, DefMemPerCPU=$DEF_MEM MB"
usage_hint
