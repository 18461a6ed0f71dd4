#!/usr/bin/env bash
# Runs one preset in every training scheme and several seeds, one workdir per run,
# then compares them in the paper's layout (python -m ddnn_jax.compare):
#   ROOT/individual-<depth>-seed<k>  each depth of the preset trained alone
#   ROOT/<scheme>-seed<k>            ddnn, ekd, ... : every depth at once
#   ROOT/comparison/                 comparison.md, .csv, .png
# Runs go one after the other on this machine; a run already finished is kept (a
# killed one resumes), so the same command continues an interrupted sweep.
set -euo pipefail

readonly PROG="${0##*/}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
# shellcheck source=launch/lib.sh
source "$REPO_ROOT/launch/lib.sh"

usage() {
  cat <<EOF
Usage: $PROG --config FILE[:GROUP] --root DIR [options] [--config.KEY=VALUE ...] [-- EXTRA_MAIN_FLAGS ...]

Options:
  --config FILE[:GROUP]  preset, e.g. configs/cifar10.py:r56_r44 (required)
  --root DIR             parent of the workdirs (required)
  --seeds N              seeds 0..N-1 of every scheme (default: 2)
  --schemes LIST         comma-separated modes (default: individual,ddnn,ekd)
  --python PATH          python to run (default: python3)
  --dry-run              print the commands instead of running them
  -h, --help             show this help

--config.KEY=VALUE overrides and everything after '--' go to every run unchanged.
Example (the README's Fashion-MNIST comparison):
  $PROG --config configs/default.py --root /tmp/schemes --seeds 2 \\
    --config.model.width=8 --config.train.num_epochs=2
EOF
}

CONFIG='' ROOT='' SEEDS=2 SCHEMES='individual,ddnn,ekd' PYTHON='python3' DRY_RUN=0
OVERRIDES=() EXTRA=()

set_option() {  # set_option NAME VALUE
  case $1 in
    --config) CONFIG=$2 ;;
    --root) ROOT=$2 ;;
    --seeds) SEEDS=$2 ;;
    --schemes) SCHEMES=$2 ;;
    --python) PYTHON=$2 ;;
    --dry-run) die "option $1 takes no value" ;;
    *) die "unknown option '$1'" ;;
  esac
  [[ -n $2 ]] || die "option $1 needs a value"
}

parse_args() {
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --*)
        parse_common "$@"
        shift "$((CONSUMED - 1))" ;;
      *) die "unexpected argument '$1'" ;;
    esac
    shift
  done
  [[ -n $CONFIG ]] || die "missing required option --config"
  [[ -n $ROOT ]] || die "missing required option --root"
  [[ $SEEDS =~ ^[1-9][0-9]*$ ]] || die "--seeds must be a positive integer, got '$SEEDS'"
  [[ $SCHEMES =~ ^[a-z_]+(,[a-z_]+)*$ ]] || die "--schemes must be modes joined by commas, got '$SCHEMES'"
}

# The preset's depths, one per line as dash-joined block counts (full net first), and
# the tuple literal that trains each alone in mode 'individual'.
preset_depths() {
  (cd "$REPO_ROOT" && "$PYTHON" -c '
import sys
from ddnn_jax import config_lib, models
config = config_lib.load_config(sys.argv[1])
config_lib.validate(config)
config.mode = "ddnn" if config.model.subnets else "individual"
for k, depth in enumerate(config_lib.depths_of(config)):
  print(models.depth_name(depth), "()" if k == 0 else f"({tuple(depth)},)")
' "$CONFIG")
}

run() {  # run WORKDIR MAIN_FLAGS...
  local -a argv=("$PYTHON" -m ddnn_jax.main "--config=$CONFIG" "--workdir=$1" "${@:2}"
                 "${OVERRIDES[@]}" "${EXTRA[@]}")
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote "${argv[@]}")"
  elif [[ -f $1/results.csv ]]; then
    printf '%s: %s is finished, kept\n' "$PROG" "$1" >&2
  else
    (cd "$REPO_ROOT" && "${argv[@]}")
  fi
}

main() {
  parse_args "$@"
  local -a depths=() workdirs=()
  local line scheme seed name subnets
  if ((DRY_RUN)) && [[ $SCHEMES != *individual* ]]; then
    :  # No python needed to print the runs.
  else
    while read -r line; do depths+=("$line"); done < <(preset_depths)
    ((${#depths[@]})) || die "cannot read the depths of --config '$CONFIG'"
  fi
  IFS=, read -r -a schemes <<<"$SCHEMES"
  for ((seed = 0; seed < SEEDS; seed++)); do
    for scheme in "${schemes[@]}"; do
      if [[ $scheme == individual ]]; then
        for line in "${depths[@]}"; do
          read -r name subnets <<<"$line"
          workdirs+=("$ROOT/individual-$name-seed$seed")
          run "${workdirs[-1]}" --config.mode=individual "--config.model.subnets=$subnets" \
            "--config.seed=$seed"
        done
      else
        workdirs+=("$ROOT/$scheme-seed$seed")
        run "${workdirs[-1]}" "--config.mode=$scheme" "--config.seed=$seed"
      fi
    done
  done
  local -a compare=("$PYTHON" -m ddnn_jax.compare "${workdirs[@]}" --out "$ROOT/comparison")
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote "${compare[@]}")"
  else
    (cd "$REPO_ROOT" && "${compare[@]}")
  fi
}

main "$@"
