#!/usr/bin/env bash
# Train on a Cloud TPU VM or TPU pod slice: create it, copy the code and
# install the pinned environment on every worker, start the same training
# command on all workers, follow their logs, delete it.
#
#   launch/tpu_vm.sh all --name=avtok --zone=us-west4-a --accelerator=v5litepod-16 \
#       --config=configs/vfal_stage1.py:L --workdir=/mnt/gcs/avtok/stage1
#
# Run with --help for every command and option; --dry-run prints each command
# (one per line, prefixed with '+ ') instead of running it.
set -euo pipefail

readonly PROG=tpu_vm.sh
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND [OPTIONS] [--config.KEY=VALUE ...]

Commands:
  create   create the TPU VM / pod slice (gcloud compute tpus tpu-vm create)
  setup    copy this checkout (or clone --repo) to every worker, install Python,
           the pinned requirements.txt and jax[tpu] at requirements.txt's jax pin
  run      start `python -m avtok_jax.main` on every worker under nohup; each
           worker logs to <remote-dir>/logs/<its hostname>.log
  logs     follow the workers' logs (Ctrl-C stops following, not training)
  stop     stop the training process on every worker
  delete   delete the TPU VM
  all      create, setup and run
  hosts    print the host and device count of --accelerator and exit

Options (also as '--option VALUE'):
  --name=NAME          TPU name (default: avtok)
  --zone=ZONE          zone (default: gcloud's compute/zone property)
  --project=PROJECT    project (default: gcloud's core/project property)
  --accelerator=TYPE   v2-N, v3-N, v4-N, v5p-N (N counts TensorCores), v5litepod-N
                       (alias v5e-N) or v6e-N (N counts chips); needed by create,
                       run, all and hosts
  --version=RUNTIME    TPU software version (default per generation: v2-v4
                       tpu-ubuntu2204-base, v5p v2-alpha-tpuv5, v5e
                       v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
  --spot               create a Spot TPU
  --config=FILE[:ARG]  config of the run, e.g. configs/vfal_stage1.py:L (run, all)
  --workdir=DIR        workdir of the run (run, all); on a multi-host slice a
                       directory every worker sees at the same path (Filestore
                       / NFS, or a bucket mounted with gcsfuse, e.g. /mnt/gcs/DIR;
                       gs:// URLs are not supported for the workdir)
  --config.KEY=VALUE   passed through to avtok_jax.main (repeatable)
  --repo=URL           setup clones this git repository instead of copying the
                       local checkout
  --branch=BRANCH      branch or tag to clone with --repo (default: main)
  --remote-dir=DIR     code directory on the workers, relative to the home
                       directory or absolute (default: avtok_jax)
  --python=PYTHON      interpreter for the virtual environment (default:
                       python3.11, the version requirements.txt is pinned for;
                       installed with apt when missing)
  --worker=all|N       workers that logs and stop talk to (default: all)
  --dry-run            print the commands instead of running them
  -h, --help           show this help

Hosts: a slice has chips / chips-per-host hosts. v2, v3, v4 and v5p names count
TensorCores (2 per chip, 4 chips per host: v4-8 = 1 host, v4-32 = v5p-32 = 4
hosts); v5e and v6e names count chips (1-, 4- and 8-chip slices are one host,
larger slices have 4 chips per host: v5litepod-16 = 4 hosts). JAX sees one
device per chip on v4/v5p/v5e/v6e and one per TensorCore on v2/v3.
EOF
}

# die, q, join_q, run (the --dry-run printer) and value_of (option values) are shared
# with the other script.
# shellcheck source=launch/lib.sh
source "$ROOT/launch/lib.sh"

# ---------------------------------------------------------------- options
COMMAND=""
NAME=avtok
ZONE=""
PROJECT=""
ACCELERATOR=""
VERSION=""
SPOT=0
CONFIG=""
WORKDIR=""
REPO=""
BRANCH=""
REMOTE_DIR=avtok_jax
PYTHON=python3.11
WORKER=all
DRY_RUN=0
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
    --spot) SPOT=1 ;;
    --config.*=*) OVERRIDES+=("$arg") ;;
    --config.*) die "override '$arg' needs the form --config.KEY=VALUE" ;;
    --name | --name=* | --zone | --zone=* | --project | --project=* | \
      --accelerator | --accelerator=* | --version | --version=* | --config | --config=* | \
      --workdir | --workdir=* | --repo | --repo=* | --branch | --branch=* | \
      --remote-dir | --remote-dir=* | --python | --python=* | --worker | --worker=*)
      value_of "$arg" "$has_next" "${2-}"
      case ${arg%%=*} in
        --name) NAME=$VALUE ;;
        --zone) ZONE=$VALUE ;;
        --project) PROJECT=$VALUE ;;
        --accelerator) ACCELERATOR=$VALUE ;;
        --version) VERSION=$VALUE ;;
        --config) CONFIG=$VALUE ;;
        --workdir) WORKDIR=$VALUE ;;
        --repo) REPO=$VALUE ;;
        --branch) BRANCH=$VALUE ;;
        --remote-dir) REMOTE_DIR=$VALUE ;;
        --python) PYTHON=$VALUE ;;
        --worker) WORKER=$VALUE ;;
      esac
      ;;
    -*) die "unknown option '$arg' (see --help)" ;;
    *)
      [[ -z $COMMAND ]] || die "unexpected argument '$arg' (one command at a time; see --help)"
      COMMAND=$arg
      ;;
  esac
  shift "$SHIFT_BY"
done

case $COMMAND in
  create | setup | run | logs | stop | delete | all | hosts) ;;
  "") die "no command given; choose create, setup, run, logs, stop, delete, all or hosts (see --help)" ;;
  *) die "unknown command '$COMMAND'; choose create, setup, run, logs, stop, delete, all or hosts" ;;
esac
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker='$WORKER' must be 'all' or a worker index"
[[ -z $BRANCH || -n $REPO ]] || die "--branch='$BRANCH' needs --repo (without it the local checkout is copied)"
[[ $REMOTE_DIR != *'~'* ]] || die "--remote-dir='$REMOTE_DIR': give it relative to the home directory, without '~'"
BRANCH=${BRANCH:-main}

# ---------------------------------------------------------------- topology
# Sets GENERATION, HOSTS, DEVICES and DEFAULT_VERSION from --accelerator.
# Chips per host: v2-v4 and v5p have 4 chips of 2 TensorCores per TPU VM
# (cloud.google.com/tpu/docs/system-architecture-tpu-vm, v4 and v5p pages).
# v5e/v6e VMs hold 1, 4 or 8 chips; slices over 8 chips are built from 4-chip
# VMs (ct5lp-hightpu-4t / ct6e-standard-4t; the v5e page's topology table
# counts 8-chip hosts instead). The count only decides --distributed=on
# (any count > 1) and what is printed: commands always go to --worker=all.
# Runtime images: cloud.google.com/tpu/docs/runtimes ("PyTorch and JAX").
topology() {
  local acc=$1 count
  if [[ $acc =~ ^v5e-([0-9]+)$ ]]; then
    acc=v5litepod-${BASH_REMATCH[1]}
  fi
  ACCELERATOR=$acc
  [[ $acc =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-([1-9][0-9]*)$ ]] ||
    die "unknown accelerator '$1'; expected v2-N, v3-N, v4-N, v5p-N, v5litepod-N (v5e-N) or v6e-N"
  GENERATION=${BASH_REMATCH[1]}
  count=${BASH_REMATCH[2]}
  case $GENERATION in
    v2 | v3 | v4 | v5p)
      ((count % 8 == 0)) || die "accelerator '$1': $GENERATION sizes count TensorCores and are multiples of 8"
      HOSTS=$((count / 8))
      if [[ $GENERATION == v2 || $GENERATION == v3 ]]; then
        DEVICES=$count
      else
        DEVICES=$((count / 2))
      fi
      ;;
    v5litepod | v6e)
      if ((count == 1 || count == 4 || count == 8)); then
        HOSTS=1
      elif ((count % 16 == 0 && count <= 256)); then
        HOSTS=$((count / 4))
      else
        die "accelerator '$1': $GENERATION slices have 1, 4, 8, 16, 32, ... 256 chips"
      fi
      DEVICES=$count
      ;;
  esac
  case $GENERATION in
    v2 | v3 | v4) DEFAULT_VERSION=tpu-ubuntu2204-base ;;
    v5p) DEFAULT_VERSION=v2-alpha-tpuv5 ;;
    v5litepod) DEFAULT_VERSION=v2-alpha-tpuv5-lite ;;
    v6e) DEFAULT_VERSION=v2-alpha-tpuv6e ;;
  esac
}

HOSTS=0
if [[ -n $ACCELERATOR ]]; then
  topology "$ACCELERATOR"
  VERSION=${VERSION:-$DEFAULT_VERSION}
elif [[ $COMMAND == create || $COMMAND == run || $COMMAND == all || $COMMAND == hosts ]]; then
  die "--accelerator is required for '$COMMAND' (it sets the host count), e.g. --accelerator=v4-8"
fi

if [[ $COMMAND == run || $COMMAND == all ]]; then
  [[ -n $CONFIG ]] || die "--config is required for '$COMMAND', e.g. --config=configs/vfal_stage1.py:L"
  [[ -n $WORKDIR ]] || die "--workdir is required for '$COMMAND', e.g. --workdir=/mnt/gcs/avtok/stage1"
  if [[ -z $REPO && ! -f $ROOT/${CONFIG%%:*} ]]; then
    die "config file '${CONFIG%%:*}' not found in $ROOT (give it relative to the repository root)"
  fi
fi

GCLOUD_FLAGS=()
[[ -z $ZONE ]] || GCLOUD_FLAGS+=("--zone=$ZONE")
[[ -z $PROJECT ]] || GCLOUD_FLAGS+=("--project=$PROJECT")

if ((HOSTS)); then
  hosts_word=hosts
  ((HOSTS > 1)) || hosts_word=host
  echo "# $ACCELERATOR: $HOSTS $hosts_word, $DEVICES JAX devices ($((DEVICES / HOSTS)) per host), runtime $VERSION"
fi
if [[ $COMMAND == hosts ]]; then
  exit 0
fi

# ---------------------------------------------------------------- commands
tpu_ssh() {
  local worker=$1 command=$2
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker="$worker" --command="$command"
}

do_create() {
  local extra=()
  ((SPOT)) && extra+=(--spot)
  run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$VERSION" "${extra[@]}"
}

do_setup() {
  local dir py tarball
  dir=$(q "$REMOTE_DIR")
  py=$(q "$PYTHON")
  if [[ -n $REPO ]]; then
    local repo branch
    repo=$(q "$REPO")
    branch=$(q "$BRANCH")
    tpu_ssh all "set -e; if [ -d $dir/.git ]; then git -C $dir fetch -q --depth 1 origin $branch; \
git -C $dir reset -q --hard FETCH_HEAD; else git clone -q --depth 1 --branch $branch $repo $dir; fi"
  else
    # This checkout without VCS data, ignored files (.venv, workdirs, caches).
    tarball=${TMPDIR:-/tmp}/avtok_src_$NAME.tgz
    run tar -czf "$tarball" --exclude-vcs --exclude-vcs-ignores --exclude=./.venv \
      --exclude='./workdir*' --exclude=./logs --exclude='*.egg-info' --exclude='.*_cache' -C "$ROOT" .
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:avtok_src.tgz" "${GCLOUD_FLAGS[@]}" --worker=all
    run rm -f "$tarball"
    tpu_ssh all "set -e; mkdir -p $dir; tar -xzf avtok_src.tgz -C $dir; rm avtok_src.tgz"
  fi
  # The jax[tpu] pin is read on the worker from the requirements.txt it installs.
  tpu_ssh all "set -e; cd $dir; if ! command -v $py >/dev/null; then sudo apt-get update -qq; \
sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $py $py-venv; fi; \
pin=\$(sed -n 's/^jax==\([^[:space:]#;]*\).*/\1/p' requirements.txt); \
if [ -z \"\$pin\" ]; then echo \"\$(hostname): no jax== pin in requirements.txt\" >&2; exit 1; fi; \
$py -m venv .venv; .venv/bin/pip install -q -U pip; \
.venv/bin/pip install -q -r requirements.txt -e . \"jax[tpu]==\$pin\"; \
.venv/bin/python -c 'import avtok_jax, jax; print(\"jax\", jax.__version__)'"
}

do_run() {
  local dir train
  dir=$(q "$REMOTE_DIR")
  train=(.venv/bin/python -m avtok_jax.main "--config=$CONFIG" "--workdir=$WORKDIR")
  # Multi-host: jax.distributed.initialize() finds the workers through the TPU
  # metadata server; 'on' makes sure it runs (Orbax needs it across hosts).
  ((HOSTS > 1)) && train+=(--distributed=on)
  train+=("${OVERRIDES[@]}")
  if [[ $WORKDIR == *://* ]]; then
    die "--workdir='$WORKDIR': URLs are not supported (logs and samples use local file APIs); mount the bucket (gcsfuse) or use Filestore/NFS"
  fi
  if ((HOSTS > 1)); then
    echo "$PROG: note: all $HOSTS workers must see '$WORKDIR' as the same directory (Filestore/NFS or a gcsfuse mount)" >&2
  fi
  tpu_ssh all "set -e; cd $dir; mkdir -p logs; h=\$(hostname); \
if [ -f logs/\$h.pid ] && kill -0 \"\$(cat logs/\$h.pid)\" 2>/dev/null; then \
echo \"\$h: training already runs (pid \$(cat logs/\$h.pid)); stop it first\" >&2; exit 1; fi; \
nohup $(join_q "${train[@]}") > logs/\$h.log 2>&1 < /dev/null & echo \$! > logs/\$h.pid; \
echo \"\$h: started pid \$!, log $dir/logs/\$h.log\""
}

do_logs() {
  local dir
  dir=$(q "$REMOTE_DIR")
  tpu_ssh "$WORKER" "h=\$(hostname); tail -n 100 -F $dir/logs/\$h.log | sed -u \"s/^/[\$h] /\""
}

do_stop() {
  local dir
  dir=$(q "$REMOTE_DIR")
  tpu_ssh "$WORKER" "h=\$(hostname); p=$dir/logs/\$h.pid; \
if [ -f \$p ] && kill \"\$(cat \$p)\" 2>/dev/null; then echo \"\$h: stopped pid \$(cat \$p)\"; \
else echo \"\$h: no training process\"; fi; rm -f \$p"
}

do_delete() {
  run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
}

case $COMMAND in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  all)
    do_create
    do_setup
    do_run
    echo "# follow the logs: launch/tpu_vm.sh logs $(join_q --name="$NAME" "${GCLOUD_FLAGS[@]}")"
    ;;
esac
