#!/usr/bin/env bash
# Start one ddnn_jax process per GPU node over ssh. Node i gets --process_id=i;
# the first node hosts the jax.distributed coordinator. Each process drives all
# GPUs of its node. Output is streamed back, prefixed by node; the script waits
# for every node and fails if any node fails. Ctrl-C or SIGTERM is forwarded to
# every node's process as SIGTERM: the run saves a checkpoint at the step it is on
# and exits 75 (so does this script); run the same command again to continue. A
# second Ctrl-C hangs up the ssh sessions at once.
set -euo pipefail

readonly PROG="${0##*/}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
# shellcheck source=launch/lib.sh
source "$REPO_ROOT/launch/lib.sh"
readonly DEFAULT_CONFIG='configs/imagenet_r50.py'

usage() {
  cat <<EOF
Usage: $PROG --nodes HOST1,HOST2,... --workdir DIR [options] [--config.KEY=VALUE ...] [-- EXTRA_MAIN_FLAGS ...]

Options:
  --nodes H1,H2,...   ssh-reachable nodes, one process each (required); H1 is process 0
  --workdir DIR       checkpoints + metrics, on storage every node sees (required)
  --port PORT         coordinator port on the first node (default: 12355)
  --coordinator HOST  coordinator address if the nodes reach H1 under another name
                      (e.g. an InfiniBand hostname; default: H1)
  --config PATH       config file, relative to --remote_dir (default: $DEFAULT_CONFIG)
  --data_dir DIR      tfds data_dir (passed as --config.data.data_dir=DIR)
  --remote_dir DIR    ddnn_jax checkout on the nodes (default: this checkout,
                      $REPO_ROOT, i.e. a shared filesystem)
  --python PATH       python on the nodes (default: python3; e.g. a venv's bin/python)
  --env KEY=VALUE     environment variable for every process (repeatable),
                      e.g. --env NCCL_DEBUG=WARN
  --dry_run           print the ssh commands, one per line, instead of running them
  -h, --help          show this help

--config.KEY=VALUE overrides and everything after '--' go to ddnn_jax.main unchanged.
Example:
  $PROG --nodes gpu01,gpu02 --workdir /shared/ddnn/r50 \\
    --data_dir /shared/tensorflow_datasets --config.train.num_epochs=120
EOF
}

# The single place where ssh command lines are assembled. -tt gives the remote
# process a terminal, so it gets SIGHUP (and dies) when this launcher is stopped.
ssh_cmd() {  # ssh_cmd HOST REMOTE_COMMAND
  printf '%s\0' ssh -tt -o BatchMode=yes "$1" "$2"
}

# Where node i's process records its pid, so that a stop can be forwarded to it.
pid_file() {  # pid_file PROCESS_ID
  printf '/tmp/ddnn_jax-%s-%s.pid' "$LAUNCH_ID" "$1"
}

remote_command() {  # remote_command PROCESS_ID
  local -a argv=()
  ((${#ENVS[@]})) && argv+=(env "${ENVS[@]}")
  argv+=("$PYTHON" -m ddnn_jax.main "--config=$CONFIG" "--workdir=$WORKDIR")
  [[ -n $DATA_DIR ]] && argv+=("--config.data.data_dir=$DATA_DIR")
  argv+=("${OVERRIDES[@]}" "${EXTRA[@]}")
  argv+=("--coordinator_address=$COORDINATOR:$PORT" "--num_processes=${#NODES[@]}" "--process_id=$1")
  # exec keeps the shell's pid: the one written to the pid file.
  printf 'cd %s && echo $$ > %s && exec %s' "$(quote "$REMOTE_DIR")" "$(pid_file "$1")" \
    "$(quote "${argv[@]}")"
}

STOPPING=0
forward_stop() {  # First INT/TERM: SIGTERM to every node's run. Second: hang up.
  if ((STOPPING)); then
    kill "${pids[@]}" 2>/dev/null || true
    return
  fi
  STOPPING=1
  printf '%s: asking every node to save and stop (again to hang up at once)\n' "$PROG" >&2
  local i
  for i in "${!NODES[@]}"; do
    ssh -o BatchMode=yes "${NODES[i]}" "kill -TERM \$(cat $(pid_file "$i")) 2>/dev/null" \
      </dev/null >/dev/null 2>&1 &
  done
}

launch() {
  local i failed=0 stopped=0
  local -a cmd
  pids=()
  for i in "${!NODES[@]}"; do
    mapfile -d '' -t cmd < <(ssh_cmd "${NODES[i]}" "$(remote_command "$i")")
    if ((DRY_RUN)); then
      printf '%s\n' "$(quote "${cmd[@]}")"
      continue
    fi
    # Tag each line with its node (and strip the terminal's \r). A process
    # substitution rather than a pipe keeps $! = ssh, whose status wait reports.
    "${cmd[@]}" </dev/null > >(sed -u -e 's/\r$//' -e "s|^|[$i:${NODES[i]}] |") 2>&1 &
    pids+=("$!")
  done
  ((DRY_RUN)) && return 0
  trap forward_stop INT TERM
  local status
  for i in "${!pids[@]}"; do
    while :; do
      status=0
      wait "${pids[i]}" || status=$?
      # A trapped signal ends `wait` early (status > 128) while the node still runs.
      if ((status <= 128)) || ! kill -0 "${pids[i]}" 2>/dev/null; then
        break
      fi
    done
    if ((status == 75)); then
      printf '%s: node %d (%s) saved a checkpoint and stopped\n' "$PROG" "$i" "${NODES[i]}" >&2
      stopped=1
    elif ((status)); then
      printf '%s: node %d (%s) exited with status %d\n' "$PROG" "$i" "${NODES[i]}" "$status" >&2
      failed=1
    fi
  done
  wait  # let the output filters drain
  ((failed)) && return 1
  ((stopped)) && return 75
  return 0
}

# --- argument parsing ----------------------------------------------------------

NODES_ARG='' PORT='12355' COORDINATOR='' CONFIG=$DEFAULT_CONFIG WORKDIR='' DATA_DIR=''
REMOTE_DIR=$REPO_ROOT PYTHON='python3' DRY_RUN=0
NODES=() ENVS=() OVERRIDES=() EXTRA=() pids=()
LAUNCH_ID="$(date +%s)-$$"

set_option() {  # set_option NAME VALUE
  case $1 in
    --nodes) NODES_ARG=$2 ;;
    --port) PORT=$2 ;;
    --coordinator) COORDINATOR=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --data_dir) DATA_DIR=$2 ;;
    --remote_dir) REMOTE_DIR=$2 ;;
    --python) PYTHON=$2 ;;
    --env)
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$2'"
      ENVS+=("$2") ;;
    --dry_run) die "option $1 takes no value" ;;
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
      --*)
        parse_common "$@"
        shift "$((CONSUMED - 1))" ;;
      *) die "unexpected argument '$1'" ;;
    esac
    shift
  done
  [[ -n $NODES_ARG ]] || die "missing required option --nodes HOST1,HOST2,..."
  [[ -n $WORKDIR ]] || die "missing required option --workdir"
  IFS=, read -r -a NODES <<<"$NODES_ARG"
  local node
  for node in "${NODES[@]}"; do
    [[ $node =~ ^[A-Za-z0-9_.@-]+$ ]] || die "bad node name '$node' in --nodes '$NODES_ARG'"
  done
  if ! [[ $PORT =~ ^[0-9]{1,5}$ ]] || ((10#$PORT < 1 || 10#$PORT > 65535)); then
    die "--port must be 1..65535, got '$PORT'"
  fi
  # user@host is for ssh only; the coordinator address needs the bare host.
  [[ -n $COORDINATOR ]] || COORDINATOR=${NODES[0]#*@}
}

main() {
  parse_args "$@"
  launch
}

main "$@"
