#!/usr/bin/env bash
# A real single-node Slurm cluster on localhost, from Debian's packages, for tests and CI.
#
#   ci/slurm/cluster.sh install     apt-get install slurmctld slurmd slurm-client munge (if missing)
#   ci/slurm/cluster.sh configure   write /etc/slurm/slurm.conf and gres.conf (only files we manage)
#   ci/slurm/cluster.sh start       start munged, slurmctld, slurmd (by pid files) and wait for the node
#   ci/slurm/cluster.sh stop        stop them (by pid files), cancel nothing else
#   ci/slurm/cluster.sh status      print daemon pids, sinfo; exit 0 only when the cluster is usable
#   ci/slurm/cluster.sh up          install + configure + start
#   ci/slurm/cluster.sh down        stop
#
# Every command is idempotent. Needs root (as on the CI machine: Debian 12, no systemd).
#
# The node is a stand-in for a GPU node: two partitions on the same host,
#   cpu   (default) for CPU rules
#   gpu-h100        with Gres=gpu:h100:N, the GPUs backed by dummy files (gres.conf needs a File)
# The node's CPUs and memory are *declared* (SlurmdParameters=config_overrides), not measured, so
# that the production profile's requests (e.g. 8 CPUs per GPU) fit on a 2-core CI machine.
# Nothing is enforced (task/none, proctrack/linuxproc): concurrency is Snakemake's --jobs.
#
# Tunables (environment):
#   SNAKETUNE_SLURM_CPUS      declared CPUs of the node          (default 16)
#   SNAKETUNE_SLURM_MEM_MB    declared memory of the node in MB  (default 64000)
#   SNAKETUNE_SLURM_GPUS      stand-in H100s on the node         (default 1)
#   SNAKETUNE_SLURM_MINJOBAGE seconds finished jobs stay in squeue (default 3600, so tests can read them; >= 3x the
#                             plugin's init-seconds-before-status-checks, see profiles/slurm-ci)
set -euo pipefail

CONF_DIR=/etc/slurm
PARKED="$CONF_DIR/slurm.conf.stopped"  # see park_config
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm
FAKE_GPU_DIR=/var/lib/slurm/fake-gpu
MUNGE_RUN=/run/munge
MARKER="# managed by snaketune ci/slurm/cluster.sh"
CONFIG_CHANGED=0

CPUS="${SNAKETUNE_SLURM_CPUS:-16}"
MEM_MB="${SNAKETUNE_SLURM_MEM_MB:-64000}"
GPUS="${SNAKETUNE_SLURM_GPUS:-1}"
MINJOBAGE="${SNAKETUNE_SLURM_MINJOBAGE:-3600}"
NODE="$(hostname -s)"

log() { echo "[slurm-ci] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }

pid_alive() {  # pid_alive PIDFILE -> 0 if the pid in it is a live process
    local f="$1" pid
    [ -s "$f" ] || return 1
    pid="$(cat "$f" 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

cmd_install() {
    need_root
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        log "packages already installed ($(slurmd -V))"
        return 0
    fi
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    log "installed $(slurmd -V)"
}

write_managed() {  # write_managed PATH < content; refuses to replace a file we did not write
    local path="$1" tmp
    if [ -e "$path" ] && ! grep -qF "$MARKER" "$path"; then
        die "$path exists and was not written by this script; refusing to overwrite a real cluster's config"
    fi
    tmp="$(mktemp "$path.XXXXXX")"
    cat >"$tmp"
    chmod 644 "$tmp"
    if [ -e "$path" ] && cmp -s "$tmp" "$path"; then rm -f "$tmp"; return 0; fi
    mv -f "$tmp" "$path"
    CONFIG_CHANGED=1
}

cmd_configure() {
    need_root
    mkdir -p "$CONF_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$FAKE_GPU_DIR"
    # Each stand-in GPU needs a character device (a plain file is rejected and then Slurm sets no
    # CUDA_VISIBLE_DEVICES): make /dev/null look-alikes named nvidia0.., or use /dev/null itself.
    local gpu_files="" i
    rm -f "$FAKE_GPU_DIR"/gpu* 2>/dev/null || true
    for ((i = 0; i < GPUS; i++)); do
        [ -c "$FAKE_GPU_DIR/nvidia$i" ] || mknod "$FAKE_GPU_DIR/nvidia$i" c 1 3 2>/dev/null || break
    done
    if [ -c "$FAKE_GPU_DIR/nvidia$((GPUS - 1))" ]; then
        if [ "$GPUS" -eq 1 ]; then gpu_files="$FAKE_GPU_DIR/nvidia0"; else gpu_files="$FAKE_GPU_DIR/nvidia[0-$((GPUS - 1))]"; fi
    elif [ "$GPUS" -eq 1 ]; then
        gpu_files=/dev/null
    else
        die "cannot create character devices for $GPUS stand-in GPUs (mknod failed); use SNAKETUNE_SLURM_GPUS=1"
    fi
    local def_mem=$((MEM_MB / CPUS))
    if [ ! -e "$CONF_DIR/slurm.conf" ] && [ -f "$PARKED" ]; then mv -f "$PARKED" "$CONF_DIR/slurm.conf"; fi
    write_managed "$CONF_DIR/slurm.conf" <<CONF
$MARKER
# A single-node test cluster on localhost. Not for production.
ClusterName=snaketune-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
# Finished jobs stay visible to squeue this long: the Slurm executor plugin polls with squeue
# (no accounting database here) and must see every job's final state.
MinJobAge=$MINJOBAGE
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# A permanent record of every finished job (id, name, partition, state, TRES incl. gres/gpu).
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
GresTypes=gpu
KillWait=10
# A job's tasks keep the nice value of the sbatch that submitted it: the test suite runs its
# background studies at low priority, their Slurm jobs too.
PropagatePrioProcess=1
InactiveLimit=0
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:h100:$GPUS State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE DefMemPerCPU=$def_mem State=UP
PartitionName=gpu-h100 Nodes=$NODE Default=NO MaxTime=INFINITE DefMemPerCPU=$def_mem State=UP
CONF
    write_managed "$CONF_DIR/gres.conf" <<CONF
$MARKER
# Stand-in GPUs: Slurm needs a File per GPU (else the node goes INVAL); nothing uses it.
NodeName=$NODE Name=gpu Type=h100 File=$gpu_files
CONF
    # 22.05 has no CgroupPlugin=disabled; with proctrack/linuxproc and task/none no cgroup.conf is
    # needed. Remove one that an older version of this script wrote.
    if [ -f "$CONF_DIR/cgroup.conf" ] && grep -qF "$MARKER" "$CONF_DIR/cgroup.conf"; then rm -f "$CONF_DIR/cgroup.conf"; fi
    log "configured $CONF_DIR/slurm.conf (node $NODE: $CPUS CPUs, $MEM_MB MB, $GPUS x gpu:h100)"
}

start_munged() {
    if pid_alive "$MUNGE_RUN/munged.pid"; then return 0; fi
    id munge >/dev/null 2>&1 || die "no user munge: run '$0 install' first"
    mkdir -p "$MUNGE_RUN" /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge "$MUNGE_RUN" /var/log/munge /var/lib/munge /etc/munge
    chmod 700 /etc/munge
    chmod 755 "$MUNGE_RUN"
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
        else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    rm -f "$MUNGE_RUN/munged.pid"
    # munged daemonizes itself and writes /run/munge/munged.pid
    su -s /bin/sh munge -c "munged --force" || runuser -u munge -- munged --force
    for _ in $(seq 50); do pid_alive "$MUNGE_RUN/munged.pid" && break; sleep 0.1; done
    pid_alive "$MUNGE_RUN/munged.pid" || die "munged did not start"
    log "munged running (pid $(cat $MUNGE_RUN/munged.pid))"
}

start_slurmctld() {
    if pid_alive "$RUN_DIR/slurmctld.pid"; then return 0; fi
    rm -f "$RUN_DIR/slurmctld.pid"
    # -i: ignore errors in saved state (e.g. left over from a killed run)
    slurmctld -i
    for _ in $(seq 100); do pid_alive "$RUN_DIR/slurmctld.pid" && break; sleep 0.1; done
    pid_alive "$RUN_DIR/slurmctld.pid" || { tail -20 "$LOG_DIR/slurmctld.log" >&2 || true; die "slurmctld did not start"; }
    log "slurmctld running (pid $(cat $RUN_DIR/slurmctld.pid))"
}

start_slurmd() {
    if pid_alive "$RUN_DIR/slurmd.pid"; then return 0; fi
    rm -f "$RUN_DIR/slurmd.pid"
    slurmd
    for _ in $(seq 100); do pid_alive "$RUN_DIR/slurmd.pid" && break; sleep 0.1; done
    pid_alive "$RUN_DIR/slurmd.pid" || { tail -20 "$LOG_DIR/slurmd.log" >&2 || true; die "slurmd did not start"; }
    log "slurmd running (pid $(cat $RUN_DIR/slurmd.pid))"
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -1; }

wait_node_ready() {
    local state=""
    for _ in $(seq 120); do
        state="$(node_state || true)"
        case "$state" in
            idle | mixed | allocated | completing) log "node $NODE is $state"; return 0 ;;
            down* | drain* | inval*)
                # ReturnToService=2 brings a DOWN node back once it registers; nudge it anyway
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    scontrol show node "$NODE" >&2 || true
    die "node $NODE not ready (state: ${state:-unknown})"
}

# While the cluster is stopped its slurm.conf is parked as slurm.conf.stopped: with Slurm installed,
# configured and down, every client command (and so the import of the Snakemake Slurm plugin, which
# runs `scontrol show config`, i.e. every `snakemake` call) waits MessageTimeout (~9 s) for the
# absent slurmctld; without a slurm.conf it fails at once.
unpark_config() {
    if [ -f "$CONF_DIR/slurm.conf" ]; then rm -f "$PARKED"
    elif [ -f "$PARKED" ]; then mv -f "$PARKED" "$CONF_DIR/slurm.conf"; fi
}

park_config() {
    if [ -f "$CONF_DIR/slurm.conf" ] && grep -qF "$MARKER" "$CONF_DIR/slurm.conf"; then
        mv -f "$CONF_DIR/slurm.conf" "$PARKED"
    fi
}

cmd_start() {
    need_root
    unpark_config
    [ -f "$CONF_DIR/slurm.conf" ] || cmd_configure
    mkdir -p "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
    start_munged
    start_slurmctld
    start_slurmd
    wait_node_ready
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
    local name="$1" f="$2" pid
    if ! pid_alive "$f"; then rm -f "$f"; return 0; fi
    pid="$(cat "$f")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$f"
    log "$name stopped (was pid $pid)"
}

cmd_stop() {
    need_root
    # cancel our jobs first, so that no job step outlives the daemons
    if pid_alive "$RUN_DIR/slurmctld.pid"; then
        scancel --full --state=RUNNING,PENDING,SUSPENDED,REQUEUED --cluster=snaketune-ci -u root >/dev/null 2>&1 \
            || scancel -u root >/dev/null 2>&1 || true
        for _ in $(seq 50); do
            [ -z "$(squeue -h -t RUNNING,COMPLETING,PENDING 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    stop_pidfile slurmd "$RUN_DIR/slurmd.pid"
    stop_pidfile slurmctld "$RUN_DIR/slurmctld.pid"
    stop_pidfile munged "$MUNGE_RUN/munged.pid"
    park_config
}

cmd_status() {
    local ok=0
    for d in "munged:$MUNGE_RUN/munged.pid" "slurmctld:$RUN_DIR/slurmctld.pid" "slurmd:$RUN_DIR/slurmd.pid"; do
        if pid_alive "${d#*:}"; then echo "${d%%:*}: running (pid $(cat "${d#*:}"))"
        else echo "${d%%:*}: stopped"; ok=1; fi
    done
    [ -f "$CONF_DIR/slurm.conf" ] || { echo "slurm.conf: parked (cluster stopped)"; ok=1; }
    if [ $ok = 0 ]; then
        sinfo -o '%P %a %D %T %c %m %G' || ok=1
        case "$(node_state || true)" in idle | mixed | allocated | completing) ;; *) ok=1 ;; esac
    fi
    return $ok
}

case "${1:-}" in
    install) cmd_install ;;
    configure) cmd_configure ;;
    start) cmd_start ;;
    stop | down) cmd_stop ;;
    status) cmd_status ;;
    up)
        cmd_install
        cmd_configure
        if [ "$CONFIG_CHANGED" = 1 ] && pid_alive "$RUN_DIR/slurmctld.pid"; then
            log "configuration changed: restarting the daemons"
            cmd_stop
        fi
        cmd_start ;;
    restart) cmd_stop; cmd_start ;;
    *) echo "usage: $0 {install|configure|start|stop|status|up|down|restart}" >&2; exit 2 ;;
esac
