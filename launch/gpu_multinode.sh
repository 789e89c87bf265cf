#!/usr/bin/env bash
# Train on several GPU nodes: one JAX process per node drives all of its GPUs.
#
#   slurm: write an sbatch script (one task per node, srun python -m
#          avtok_jax.main ... --distributed=on; JAX reads SLURM's variables) and
#          submit it;
#   ssh:   start one process per host over ssh with --coordinator_address=
#          <first host>:PORT --num_processes=N --process_id=I, log each host's
#          output to LOG_DIR/<host>.log and wait for all of them.
#
#   launch/gpu_multinode.sh slurm --nodes=2 --config=configs/vfal_stage1.py:L --workdir=/shared/avtok/stage1
#   launch/gpu_multinode.sh ssh --hosts=gpu1,gpu2 --config=configs/vfal_stage1.py:L --workdir=/shared/avtok/stage1
#
# Run with --help for every option; --dry-run prints each command (one per
# line, prefixed with '+ ') instead of running it.
set -euo pipefail

readonly PROG=gpu_multinode.sh
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT

usage() {
  cat <<'EOF'
Usage: launch/gpu_multinode.sh slurm|ssh [OPTIONS] [--config.KEY=VALUE ...]

Modes:
  slurm    write an sbatch script (--nodes nodes, one task per node, all GPUs of
           a node in that task) and submit it with sbatch
  ssh      start one process per --hosts entry over ssh (coordinator: the first
           host) and wait for all of them; Ctrl-C ends them all

Options (also as '--option VALUE'):
  --config=FILE[:ARG]  config of the run, e.g. configs/vfal_stage1.py:L (required)
  --workdir=DIR        workdir of the run (required); every node must see the
                       same directory (a shared file system)
  --config.KEY=VALUE   passed through to avtok_jax.main (repeatable)
  --repo-dir=DIR       this repository's path on the nodes (default: this
                       checkout, i.e. a shared file system); relative --workdir
                       and --config are relative to it
  --venv=DIR           virtual environment on the nodes (default: REPO_DIR/.venv)
  --setup              first create/refresh --venv: the pinned requirements.txt,
                       the package, and jax[cuda12] at requirements.txt's jax pin
                       (slurm: once, in the batch script; ssh: on every host)
  --python=PYTHON      interpreter that --setup creates the venv with (default:
                       python3.11, the version requirements.txt is pinned for)
  --log-dir=DIR        logs (and the sbatch script) (default: REPO_DIR/logs)
  --job-name=NAME      job name, log file prefix (default: avtok)
  --dry-run            print the commands (and the sbatch script) instead of
                       running them
  -h, --help           show this help
slurm:
  --nodes=N            number of nodes (required)
  --gpus-per-node=G    GPUs per node (default: 8)
  --partition=NAME     SLURM partition
  --time=LIMIT         time limit, e.g. 24:00:00
  --sbatch=ARG         extra '#SBATCH ARG' line, e.g. --sbatch=--account=proj (repeatable)
ssh:
  --hosts=H1,H2,...    hosts (ssh destinations, user@host allowed), process i runs
                       on the i-th; the coordinator listens on the first
  --port=PORT          coordinator port on the first host (default: 8476)
EOF
}

# die, q, join_q, run (the --dry-run printer) and value_of (option values) are shared
# with the other script.
# shellcheck source=launch/lib.sh
source "$ROOT/launch/lib.sh"

# ---------------------------------------------------------------- options
MODE=""
CONFIG=""
WORKDIR=""
REPO_DIR=$ROOT
VENV=""
SETUP=0
PYTHON=python3.11
LOG_DIR=""
JOB_NAME=avtok
DRY_RUN=0
NODES=""
GPUS_PER_NODE=8
PARTITION=""
TIME_LIMIT=""
SBATCH_ARGS=()
HOSTS_ARG=""
PORT=8476
OVERRIDES=()

while (($#)); do
  arg=$1
  SHIFT_BY=1
  has_next=$(($# > 1))
  case $arg in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) DRY_RUN=1 ;;
    --setup) SETUP=1 ;;
    --config.*=*) OVERRIDES+=("$arg") ;;
    --config.*) die "override '$arg' needs the form --config.KEY=VALUE" ;;
    --config | --config=* | --workdir | --workdir=* | --repo-dir | --repo-dir=* | \
      --venv | --venv=* | --python | --python=* | --log-dir | --log-dir=* | \
      --job-name | --job-name=* | --nodes | --nodes=* | --gpus-per-node | --gpus-per-node=* | \
      --partition | --partition=* | --time | --time=* | --sbatch | --sbatch=* | \
      --hosts | --hosts=* | --port | --port=*)
      value_of "$arg" "$has_next" "${2-}"
      case ${arg%%=*} in
        --config) CONFIG=$VALUE ;;
        --workdir) WORKDIR=$VALUE ;;
        --repo-dir) REPO_DIR=$VALUE ;;
        --venv) VENV=$VALUE ;;
        --python) PYTHON=$VALUE ;;
        --log-dir) LOG_DIR=$VALUE ;;
        --job-name) JOB_NAME=$VALUE ;;
        --nodes) NODES=$VALUE ;;
        --gpus-per-node) GPUS_PER_NODE=$VALUE ;;
        --partition) PARTITION=$VALUE ;;
        --time) TIME_LIMIT=$VALUE ;;
        --sbatch) SBATCH_ARGS+=("$VALUE") ;;
        --hosts) HOSTS_ARG=$VALUE ;;
        --port) PORT=$VALUE ;;
      esac
      ;;
    -*) die "unknown option '$arg' (see --help)" ;;
    *)
      [[ -z $MODE ]] || die "unexpected argument '$arg' (one mode at a time; see --help)"
      MODE=$arg
      ;;
  esac
  shift "$SHIFT_BY"
done

case $MODE in
  slurm | ssh) ;;
  "") die "no mode given; choose slurm or ssh (see --help)" ;;
  *) die "unknown mode '$MODE'; choose slurm or ssh" ;;
esac
[[ -n $CONFIG ]] || die "--config is required, e.g. --config=configs/vfal_stage1.py:L"
[[ -n $WORKDIR ]] || die "--workdir is required, e.g. --workdir=/shared/avtok/stage1"
if [[ $REPO_DIR == "$ROOT" && $CONFIG != /* && ! -f $ROOT/${CONFIG%%:*} ]]; then
  die "config file '${CONFIG%%:*}' not found in $ROOT (give it relative to the repository root)"
fi
VENV=${VENV:-$REPO_DIR/.venv}
LOG_DIR=${LOG_DIR:-$REPO_DIR/logs}
[[ $JOB_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job-name='$JOB_NAME' may only use letters, digits, '_', '.', '-'"

if [[ $MODE == slurm ]]; then
  [[ -n $NODES ]] || die "--nodes is required for 'slurm', e.g. --nodes=2"
  [[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes='$NODES' must be a positive integer"
  [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node='$GPUS_PER_NODE' must be a positive integer"
  [[ -z $HOSTS_ARG ]] || die "--hosts is for 'ssh'; slurm picks the nodes (--nodes)"
else
  [[ -n $HOSTS_ARG ]] || die "--hosts is required for 'ssh', e.g. --hosts=gpu1,gpu2"
  [[ -z $NODES ]] || die "--nodes is for 'slurm'; ssh runs one process per --hosts entry"
  [[ -z $PARTITION && -z $TIME_LIMIT && ${#SBATCH_ARGS[@]} -eq 0 ]] ||
    die "--partition, --time and --sbatch are for 'slurm'"
  if [[ ! $PORT =~ ^[1-9][0-9]*$ ]] || ((PORT > 65535)); then
    die "--port='$PORT' must be a TCP port (1-65535)"
  fi
fi

# The environment --setup builds: jax[cuda12] at the same version as the jax
# pin in requirements.txt (read here, never written twice).
setup_command() {
  local pin
  pin=$(sed -n 's/^jax==\([^[:space:]#;]*\).*/\1/p' "$ROOT/requirements.txt")
  [[ -n $pin ]] || die "no 'jax==' pin in $ROOT/requirements.txt"
  printf '%s' "set -e; cd $(q "$REPO_DIR"); $(join_q "$PYTHON" -m venv "$VENV"); \
$(join_q "$VENV/bin/pip" install -q -U pip); \
$(join_q "$VENV/bin/pip" install -q -r requirements.txt -e . "jax[cuda12]==$pin")"
}

TRAIN=("$VENV/bin/python" -m avtok_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" --distributed=on)

# ---------------------------------------------------------------- slurm
do_slurm() {
  local script=$LOG_DIR/$JOB_NAME.sbatch text arg device_ids
  # '#SBATCH' lines take no shell quoting.
  [[ $LOG_DIR != *[[:space:]]* ]] || die "--log-dir='$LOG_DIR' must not contain spaces (it goes into #SBATCH --output)"
  # JAX's SLURM detection gives each process only GPU $SLURM_LOCALID (it
  # assumes one task per GPU; jax/_src/clusters/cluster.py); with one task per
  # node, JAX_LOCAL_DEVICE_IDS hands it all GPUs of its node.
  device_ids=$(seq -s, 0 $((GPUS_PER_NODE - 1)))
  text="#!/usr/bin/env bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --output=$LOG_DIR/%x-%j.out"
  [[ -z $PARTITION ]] || text+=$'\n'"#SBATCH --partition=$PARTITION"
  [[ -z $TIME_LIMIT ]] || text+=$'\n'"#SBATCH --time=$TIME_LIMIT"
  for arg in "${SBATCH_ARGS[@]}"; do
    text+=$'\n'"#SBATCH $arg"
  done
  text+=$'\n'"set -euo pipefail"
  text+=$'\n'"cd $(q "$REPO_DIR")"
  if ((SETUP)); then
    # The batch script runs on the first node; the venv is on the shared disk.
    text+=$'\n'"bash -c $(q "$(setup_command)")"
  fi
  text+=$'\n'"export JAX_LOCAL_DEVICE_IDS=$device_ids"
  text+=$'\n'"srun --kill-on-bad-exit=1 --output=$(q "$LOG_DIR/%x-%j-node%n.log") $(join_q "${TRAIN[@]}" "${OVERRIDES[@]}")"
  run mkdir -p "$LOG_DIR"
  if ((DRY_RUN)); then
    printf '+ cat > %s <<'"'EOF'"'\n%s\nEOF\n' "$(q "$script")" "$text"
  else
    printf '+ cat > %s <<...\n' "$(q "$script")" >&2
    printf '%s\n' "$text" >"$script"
  fi
  run sbatch "$script"
  echo "# logs: $LOG_DIR/$JOB_NAME-<job id>-node<N>.log (one per node)"
}

# ---------------------------------------------------------------- ssh
do_ssh() {
  local hosts=() host coordinator remote i status=0
  IFS=, read -r -a hosts <<<"$HOSTS_ARG"
  for host in "${hosts[@]}"; do
    [[ $host =~ ^[A-Za-z0-9_.@-]+$ ]] || die "--hosts: bad host name '$host'"
  done
  coordinator=${hosts[0]#*@}:$PORT
  echo "# ${#hosts[@]} processes, coordinator $coordinator"
  if ((SETUP)); then
    for host in "${hosts[@]}"; do
      run ssh -o BatchMode=yes "$host" "$(setup_command)"
    done
  fi
  run mkdir -p "$LOG_DIR"
  PIDS=()
  for i in "${!hosts[@]}"; do
    host=${hosts[i]}
    remote="cd $(q "$REPO_DIR") && exec $(join_q "${TRAIN[@]}" "--coordinator_address=$coordinator" \
      "--num_processes=${#hosts[@]}" "--process_id=$i" "${OVERRIDES[@]}")"
    # -tt: a pseudo-terminal, so that the remote process gets SIGHUP and ends
    # when this ssh client ends (Ctrl-C here, or another host failed).
    local cmd=(ssh -tt -o BatchMode=yes "$host" "$remote")
    local log=$LOG_DIR/${host#*@}.log
    if ((DRY_RUN)); then
      printf '+ %s < /dev/null > %s 2>&1 &\n' "$(join_q "${cmd[@]}")" "$(q "$log")"
    else
      printf '+ %s < /dev/null > %s 2>&1 &\n' "$(join_q "${cmd[@]}")" "$(q "$log")" >&2
      "${cmd[@]}" </dev/null >"$log" 2>&1 &
      PIDS+=($!)
    fi
  done
  ((DRY_RUN)) && return 0
  trap 'kill "${PIDS[@]}" 2>/dev/null || true' INT TERM
  echo "# waiting for ${#hosts[@]} processes; logs: $LOG_DIR/<host>.log" >&2
  # Poll, so that the first process to end is noticed whichever it is: if it
  # failed, end the others (their collectives would wait for it forever).
  local running=("${!PIDS[@]}") rest rc
  while ((${#running[@]})); do
    sleep 0.2
    rest=()
    for i in "${running[@]}"; do
      if kill -0 "${PIDS[i]}" 2>/dev/null; then
        rest+=("$i")
        continue
      fi
      rc=0
      wait "${PIDS[i]}" || rc=$?
      if ((rc == 0)); then
        echo "# ${hosts[i]} (process $i) finished" >&2
      elif ((status == 0)); then
        status=$rc
        echo "$PROG: ${hosts[i]} (process $i) exited with status $rc (log: $LOG_DIR/${hosts[i]#*@}.log); stopping the others" >&2
        kill "${PIDS[@]}" 2>/dev/null || true
      fi
    done
    running=("${rest[@]}")
  done
  return "$status"
}

case $MODE in
  slurm) do_slurm ;;
  ssh) do_ssh ;;
esac
