#!/usr/bin/env bash
# A real single-node Slurm on this machine, every file under one base folder (for tests/slurm_test.sh and for
# trying the sbatch scripts by hand):
#
#   scripts/slurm/local-cluster.sh up   BASE   # munged + slurmctld -D + slurmd -D; returns once sinfo shows the node idle
#   eval "$(scripts/slurm/local-cluster.sh env BASE)"   # export SLURM_CONF=BASE/etc/slurm.conf
#   sbatch --wait scripts/slurm/ci.sbatch; sinfo; squeue ...
#   scripts/slurm/local-cluster.sh down BASE   # cancel jobs, stop the daemons, wait until they are gone
#
# BASE holds munge/ (own key, socket, log), etc/slurm.conf, state/, spool/, log/ (daemon logs) and run/ (PIDs).
# The node is `hostname -s`, advertising CPUS (default 8) CPUs on however many cores the machine has
# (SlurmdParameters=config_overrides), one partition `ci`; no cgroups, no accounting, MpiDefault=pmix (Debian's
# Open MPI has PMIx only: `srun --mpi=pmix`). The daemons run as the caller (root here: SlurmUser=root).
# Ports are picked free at `up` (SLURMCTLD_PORT / SLURMD_PORT override), so two clusters can coexist.
# Environment: CPUS (8), UP_TIMEOUT (seconds to wait for the node to be idle, 60), KILL_WAIT (Slurm's KillWait, 5).
# Needs the Debian packages slurm-wlm slurmctld slurmd slurm-client munge.
set -euo pipefail

die() { echo "local-cluster: error: $*" >&2; exit 1; }
usage() { echo "usage: $0 up|down|env|status BASE" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
case $2 in /*) BASE=$2 ;; *) BASE=$(pwd)/$2 ;; esac
BASE=${BASE%/}
CONF=$BASE/etc/slurm.conf
NODE=$(hostname -s)

# alive PID: the process exists and is not a zombie (stopped daemons linger as zombies until PID 1 reaps them,
# so `kill -0` alone says "alive" for a while)
alive() {
  local st
  st=$(sed -n 's/^[0-9]* (.*) \([A-Za-z]\) .*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
# ours PID: alive and its command line names BASE (guards against a recycled PID)
ours() { alive "$1" && tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$BASE"; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

show_logs() {
  local f
  for f in "$BASE"/log/*.log "$BASE"/log/*.out "$BASE"/munge/munged.log; do
    [ -s "$f" ] || continue
    echo "---- $f (last 40 lines)" >&2
    tail -n 40 "$f" >&2
  done
}

start_bg() {  # start_bg NAME cmd...: run in the background, stdout+stderr to log/NAME.out, PID to run/NAME.pid
  local name=$1; shift
  setsid "$@" > "$BASE/log/$name.out" 2>&1 < /dev/null &
  echo $! > "$BASE/run/$name.pid"
}

stop_pid() {  # stop_pid NAME: SIGTERM, wait up to 10 s, then SIGKILL and wait up to 5 s more
  local f=$BASE/run/$1.pid pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if ours "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      echo "local-cluster: $1 (pid $pid) ignored SIGTERM for 10 s: SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    fi
    alive "$pid" && { echo "local-cluster: error: $1 (pid $pid) still alive" >&2; return 1; }
  fi
  rm -f "$f"
}

up() {
  for p in munged slurmctld slurmd sinfo; do
    command -v "$p" > /dev/null || [ -x "/usr/sbin/$p" ] ||
      die "$p not found: apt-get install slurm-wlm slurmctld slurmd slurm-client munge"
  done
  export PATH=$PATH:/usr/sbin
  [ -e "$BASE/run/slurmctld.pid" ] && ours "$(cat "$BASE/run/slurmctld.pid")" && die "a cluster is already up in $BASE"
  mkdir -p "$BASE"/{munge/run,etc,state,spool/slurmd,log,run,tmp}
  chmod 0700 "$BASE/munge"
  # munge: its own key (1 KiB random, 0400) and socket
  rm -f "$BASE/munge/munge.key"
  dd if=/dev/urandom of="$BASE/munge/munge.key" bs=1024 count=1 status=none
  chmod 0400 "$BASE/munge/munge.key"
  local sock=$BASE/munge/run/munge.socket.2
  start_bg munged munged -F --force --key-file="$BASE/munge/munge.key" --socket="$sock" \
    --log-file="$BASE/munge/munged.log" --pid-file="$BASE/munge/run/munged.pid" --seed-file="$BASE/munge/munged.seed"

  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
  [ -S "$sock" ] || { show_logs; down_quiet; die "munged did not create $sock"; }

  local cport=${SLURMCTLD_PORT:-$(free_port)} dport=${SLURMD_PORT:-$(free_port)}
  [ "$cport" != "$dport" ] || dport=$((cport + 1))
  cat > "$CONF" <<EOF
# written by scripts/slurm/local-cluster.sh: a single-node cluster under $BASE
ClusterName=dsv3local
SlurmctldHost=$NODE
SlurmctldPort=$cport
SlurmdPort=$dport
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again only after it (default 120 s)
AuthInfo=socket=$sock,cred_expire=${CRED_EXPIRE:-5}
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/slurmd
TmpFS=$BASE/tmp
SlurmctldPidFile=$BASE/run/slurmctld.daemon.pid
SlurmdPidFile=$BASE/run/slurmd.daemon.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=pmix
EnforcePartLimits=ALL
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
# fast scheduling and fast kills: this cluster runs tests
SchedulerParameters=sched_interval=1
KillWait=${KILL_WAIT:-5}
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=${CPUS:-8} State=UNKNOWN
PartitionName=ci Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$CONF
  # -i: ignore old state; -f: our conf (also puts BASE on the command line, which `ours` checks)
  start_bg slurmctld slurmctld -D -i -f "$CONF"
  start_bg slurmd slurmd -D -f "$CONF" -N "$NODE"
  local t0=$SECONDS timeout=${UP_TIMEOUT:-60} state=""
  while :; do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    [ "$state" = idle ] && break
    for d in munged slurmctld slurmd; do
      alive "$(cat "$BASE/run/$d.pid")" || { show_logs; down_quiet; die "$d exited during startup (logs above)"; }
    done
    if (( SECONDS - t0 >= timeout )); then
      show_logs; down_quiet
      die "the node $NODE was not idle after ${timeout}s (sinfo state: '${state:-none}'; daemon logs above)"
    fi
    sleep 0.2
  done
  echo "local-cluster: up in $BASE (node $NODE idle, ${CPUS:-8} CPUs, ports $cport/$dport, $((SECONDS - t0)) s)" >&2
}

down_quiet() { down 2> /dev/null || true; }

down() {
  export PATH=$PATH:/usr/sbin
  [ -d "$BASE" ] || return 0
  local rc=0
  # cancel what still runs, so that slurmd's steps (and their tasks) go before the daemons do
  if [ -f "$CONF" ] && [ -f "$BASE/run/slurmctld.pid" ] && ours "$(cat "$BASE/run/slurmctld.pid")"; then
    export SLURM_CONF=$CONF
    local jobs
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      timeout 10 scancel $jobs 2>/dev/null || true
      for _ in $(seq 100); do
        [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.2
      done
    fi
  fi
  stop_pid slurmd || rc=1
  stop_pid slurmctld || rc=1
  # leftovers: any slurmstepd or task still holding a file under BASE (its step socket, spool, munge socket)
  local p
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$p" = $$ ] && continue
    if [ -n "$(find "/proc/$p/fd" -lname "$BASE/spool/*" -print -quit 2> /dev/null)" ]; then
      alive "$p" && { echo "local-cluster: killing leftover pid $p ($(tr '\0' ' ' < /proc/$p/cmdline))" >&2
                      kill -KILL "$p" 2>/dev/null || true; }
    fi
  done
  stop_pid munged || rc=1
  [ $rc = 0 ] || { show_logs; die "some daemon did not stop"; }
  echo "local-cluster: down ($BASE)" >&2
}

status() {
  local d
  for d in munged slurmctld slurmd; do
    if [ -f "$BASE/run/$d.pid" ] && ours "$(cat "$BASE/run/$d.pid")"; then echo "$d: running (pid $(cat "$BASE/run/$d.pid"))"
    else echo "$d: not running"; fi
  done
  [ -f "$CONF" ] && SLURM_CONF=$CONF sinfo 2>/dev/null || true
}

case $cmd in
  up) up ;;
  down) down ;;
  env) [ -f "$CONF" ] || die "no $CONF (run: $0 up $BASE)"; printf 'export SLURM_CONF=%q\n' "$CONF" ;;
  status) status ;;
  *) usage ;;
esac
