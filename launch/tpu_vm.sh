#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or pod slice), install ddnn_jax on every
# worker and start training. Every `gcloud` command goes through gcloud_tpu(),
# so --dry_run prints exactly what would run.
set -euo pipefail

readonly PROG="${0##*/}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
# shellcheck source=launch/lib.sh
source "$REPO_ROOT/launch/lib.sh"
readonly DEFAULT_REPO='https://github.com/ddnn-jax/ddnn_jax.git'
readonly DEFAULT_CONFIG='configs/imagenet_r50.py'
# The tildes are meant literally here: the remote shell expands them.
# shellcheck disable=SC2088
readonly REMOTE_DIR='~/ddnn_jax' REMOTE_LOGS='~/ddnn_jax_logs'
readonly SRC_TARBALL="${TMPDIR:-/tmp}/ddnn_jax_src.tar.gz"
readonly LIBTPU_INDEX='https://storage.googleapis.com/jax-releases/libtpu_releases.html'

usage() {
  cat <<EOF
Usage: $PROG SUBCOMMAND [options] [--config.KEY=VALUE ...] [-- EXTRA_MAIN_FLAGS ...]

Subcommands:
  create        create the TPU VM (needs --accelerator_type)
  install       install ddnn_jax + jax[tpu] on all workers (git clone, or --copy_local)
  prepare-data  build ImageNet as ArrayRecord into --data_dir with tfds, on worker 0
  train         start training under nohup on all workers (needs --workdir)
  tail          follow a log (worker 0 by default; --worker all for every worker)
  stop          stop training on all workers: SIGTERM, the run saves a checkpoint and exits
  delete        delete the TPU VM
  all           create + install + train

Options:
  --name NAME              TPU VM name (required)
  --zone ZONE              e.g. us-central2-b (default: gcloud's compute/zone)
  --project PROJECT        GCP project (default: gcloud's core/project)
  --accelerator_type TYPE  e.g. v4-8, v3-32, v5litepod-16
  --version VERSION        TPU software version (default: tpu-ubuntu2204-base;
                           v5e wants v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5)
  --spot | --preemptible   create a Spot / preemptible TPU
  --repo URL               git repo to clone (default: $DEFAULT_REPO)
  --branch BRANCH          git branch or tag (default: main)
  --copy_local             install from this checkout (scp a tarball) instead of git
  --config PATH            config file, relative to the repo (default: $DEFAULT_CONFIG)
  --workdir DIR            checkpoints + metrics; use gs://... on multi-host slices
  --data_dir DIR           tfds data_dir, e.g. gs://BUCKET/tensorflow_datasets
                           (passed as --config.data.data_dir=DIR)
  --manual_dir DIR         prepare-data: folder holding ILSVRC2012_img_{train,val}.tar
  --log train|prepare-data tail: which log to follow (default: train)
  --worker N|all           tail: which worker (default: 0)
  --yes                    delete: do not ask for confirmation
  --dry_run                print the commands, one per line, instead of running them
  -h, --help               show this help

--config.KEY=VALUE overrides and everything after '--' go to ddnn_jax.main unchanged.
Example:
  $PROG all --name ddnn-v4 --zone us-central2-b --accelerator_type v4-8 \\
    --workdir gs://my-bucket/ddnn/r50 --data_dir gs://my-bucket/tensorflow_datasets \\
    --config.train.num_epochs=120
EOF
}

note() { printf '%s: %s\n' "$PROG" "$*" >&2; }

run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote "$@")"
  else
    "$@"
  fi
}

# The single place where gcloud command lines are assembled.
gcloud_tpu() {
  local verb=$1
  shift
  local -a cmd=(gcloud compute tpus tpu-vm "$verb" "$@")
  [[ -n $ZONE ]] && cmd+=("--zone=$ZONE")
  [[ -n $PROJECT ]] && cmd+=("--project=$PROJECT")
  run "${cmd[@]}"
}

tpu_ssh() {  # tpu_ssh WORKER REMOTE_COMMAND
  gcloud_tpu ssh "$NAME" "--worker=$1" "--command=$2"
}

# --- subcommands -------------------------------------------------------------

cmd_create() {
  [[ -n $ACCEL ]] || die "create needs --accelerator_type (e.g. v4-8)"
  local -a args=("$NAME" "--accelerator-type=$ACCEL" "--version=$VERSION")
  ((SPOT)) && args+=(--spot)
  ((PREEMPTIBLE)) && args+=(--preemptible)
  gcloud_tpu create "${args[@]}"
}

cmd_install() {
  local fetch
  if ((COPY_LOCAL)); then
    # A tarball rather than `scp --recurse` keeps .git, caches and venvs out.
    run tar -czf "$SRC_TARBALL" -C "$REPO_ROOT" --exclude=.git --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.venv --exclude=venv --exclude=.pytest_cache .
    gcloud_tpu scp "$SRC_TARBALL" "$NAME:ddnn_jax_src.tar.gz" --worker=all
    fetch="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/ddnn_jax_src.tar.gz -C $REMOTE_DIR"
  else
    fetch="rm -rf $REMOTE_DIR && git clone --depth=1 --branch $(quote "$BRANCH") $(quote "$REPO") $REMOTE_DIR"
  fi
  # gcsfs / google-cloud-storage let tfds, etils and tensorboardX use gs:// paths.
  tpu_ssh all "set -e; $fetch; python3 -m pip install -q -U pip; \
python3 -m pip install -q -e $REMOTE_DIR 'jax[tpu]' gcsfs google-cloud-storage -f $LIBTPU_INDEX"
}

cmd_prepare_data() {
  [[ -n $DATA_DIR ]] || die "prepare-data needs --data_dir (e.g. gs://BUCKET/tensorflow_datasets)"
  [[ -n $MANUAL_DIR ]] || die "prepare-data needs --manual_dir (folder with ILSVRC2012_img_{train,val}.tar)"
  note "recipe: 1) download ILSVRC2012_img_train.tar + ILSVRC2012_img_val.tar from image-net.org;"
  note "        2) gcloud storage cp ILSVRC2012_img_*.tar $MANUAL_DIR/  (the TPU's service account needs read+write);"
  note "        3) this runs 'tfds build' on worker 0 under nohup (hours): follow it with '$PROG tail --log prepare-data';"
  note "        4) train with --data_dir $DATA_DIR"
  local build
  build="tfds build imagenet2012 --data_dir=$(quote "$DATA_DIR") --manual_dir=$(quote "$MANUAL_DIR") --file_format=array_record"
  # tensorflow is only needed to build (image re-encoding), not to train.
  tpu_ssh 0 "set -e; python3 -m pip install -q tensorflow-cpu tensorflow-datasets array_record gcsfs; \
mkdir -p $REMOTE_LOGS; export PATH=\"\$HOME/.local/bin:\$PATH\"; \
nohup $build >> $REMOTE_LOGS/prepare-data.log 2>&1 < /dev/null &"
}

main_flags() {  # the argv of ddnn_jax.main, shell-quoted for the remote shell
  # --distributed: jax reads the pod slice's topology (a single-host VM runs alone).
  local -a flags=("--config=$CONFIG" "--workdir=$WORKDIR" --distributed)
  [[ -n $DATA_DIR ]] && flags+=("--config.data.data_dir=$DATA_DIR")
  flags+=("${OVERRIDES[@]}" "${EXTRA[@]}")
  quote "${flags[@]}"
}

cmd_train() {
  [[ -n $WORKDIR ]] || die "train needs --workdir (gs://... on multi-host slices)"
  [[ $WORKDIR == gs://* ]] || note "warning: workdir '$WORKDIR' is not gs://; every worker will write its own copy"
  local pid="$REMOTE_LOGS/train.pid"
  # A second trainer would fail on the busy TPU; refuse early with a clear message.
  # setsid: the trainer leads its own process group, so `stop` also ends its
  # data-loader children. nohup + redirected stdio let the ssh session return.
  tpu_ssh all "set -e; mkdir -p $REMOTE_LOGS; cd $REMOTE_DIR; \
if [ -f $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then echo \"already training (pid \$(cat $pid)); run '$PROG stop' first\" >&2; exit 1; fi; \
setsid nohup python3 -m ddnn_jax.main $(main_flags) >> $REMOTE_LOGS/train.log 2>&1 < /dev/null & \
echo \$! > $pid"
}

cmd_tail() {
  [[ $LOG == train || $LOG == prepare-data ]] || die "--log must be 'train' or 'prepare-data', got '$LOG'"
  [[ $TAIL_WORKER == all || $TAIL_WORKER =~ ^[0-9]+$ ]] || die "--worker must be a number or 'all', got '$TAIL_WORKER'"
  tpu_ssh "$TAIL_WORKER" "tail -n 200 -F $REMOTE_LOGS/$LOG.log"
}

cmd_stop() {
  # SIGTERM to the trainer: it saves a checkpoint at its step, closes its data workers
  # and exits (75). Whatever is left of its process group after 5 minutes is killed.
  local pid="$REMOTE_LOGS/train.pid"
  tpu_ssh all "if [ -f $pid ]; then p=\$(cat $pid); kill -TERM \$p 2>/dev/null || true; \
for _ in \$(seq 300); do kill -0 \$p 2>/dev/null || break; sleep 1; done; \
kill -- -\$p 2>/dev/null || true; rm -f $pid; fi"
}

cmd_delete() {
  local -a args=("$NAME")
  ((YES)) && args+=(--quiet)
  gcloud_tpu delete "${args[@]}"
}

# --- argument parsing ----------------------------------------------------------

SUBCOMMAND='' NAME='' ZONE='' PROJECT='' ACCEL='' VERSION='tpu-ubuntu2204-base'
REPO=$DEFAULT_REPO BRANCH='main' CONFIG=$DEFAULT_CONFIG WORKDIR='' DATA_DIR=''
MANUAL_DIR='' LOG='train' TAIL_WORKER='0'
DRY_RUN=0 SPOT=0 PREEMPTIBLE=0 COPY_LOCAL=0 YES=0
OVERRIDES=() EXTRA=()

set_option() {  # set_option NAME VALUE
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator_type) ACCEL=$2 ;;
    --version) VERSION=$2 ;;
    --repo) REPO=$2 ;;
    --branch) BRANCH=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --data_dir) DATA_DIR=$2 ;;
    --manual_dir) MANUAL_DIR=$2 ;;
    --log) LOG=$2 ;;
    --worker) TAIL_WORKER=$2 ;;
    --dry_run | --spot | --preemptible | --copy_local | --yes) die "option $1 takes no value" ;;
    *) die "unknown option '$1'" ;;
  esac
  [[ -n $2 ]] || die "option $1 needs a value"
}

parse_args() {
  canonical_flags "$@"
  set -- "${CANONICAL[@]}"
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --dry_run) DRY_RUN=1 ;;
      --spot) SPOT=1 ;;
      --preemptible) PREEMPTIBLE=1 ;;
      --copy_local) COPY_LOCAL=1 ;;
      --yes) YES=1 ;;
      --*)
        parse_common "$@"
        shift "$((CONSUMED - 1))" ;;
      -*) die "unknown option '$1'" ;;
      *)
        [[ -z $SUBCOMMAND ]] || die "unexpected argument '$1' (subcommand is already '$SUBCOMMAND')"
        SUBCOMMAND=$1 ;;
    esac
    shift
  done
  [[ -n $SUBCOMMAND ]] || die "missing SUBCOMMAND (create|install|prepare-data|train|tail|stop|delete|all)"
  [[ -n $NAME ]] || die "missing required option --name"
  ((SPOT && PREEMPTIBLE)) && die "--spot and --preemptible are mutually exclusive"
  return 0
}

main() {
  parse_args "$@"
  case $SUBCOMMAND in
    create) cmd_create ;;
    install) cmd_install ;;
    prepare-data) cmd_prepare_data ;;
    train) cmd_train ;;
    tail) cmd_tail ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
    all)
      # Check train's needs before paying for a TPU.
      [[ -n $ACCEL ]] || die "all needs --accelerator_type (e.g. v4-8)"
      [[ -n $WORKDIR ]] || die "all needs --workdir"
      cmd_create
      cmd_install
      cmd_train ;;
    *) die "unknown subcommand '$SUBCOMMAND'" ;;
  esac
}

main "$@"
