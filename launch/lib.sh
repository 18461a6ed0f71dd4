# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run). The caller defines PROG,
# OVERRIDES=(), EXTRA=() and set_option NAME VALUE for its own options.

# One readable line on stderr and exit 2, like a bad-usage error from getopt.
die() {
  printf '%s: error: %s (see --help)\n' "$PROG" "$*" >&2
  exit 2
}

# Shell-quote each argument so a printed line can be pasted back into a shell.
quote() {
  local out='' arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
      out+="$arg "
    else
      out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

# canonical_flags ARGS...: sets CANONICAL to ARGS with every option name before `--`
# spelled with underscores (--data-dir -> --data_dir), the one spelling of every ddnn_jax
# tool; the hyphenated spelling stays accepted. --config.* overrides and values are kept.
# shellcheck disable=SC2034  # CANONICAL is the caller's.
canonical_flags() {
  CANONICAL=()
  local arg name passthrough=0
  for arg in "$@"; do
    if ((passthrough)) || [[ $arg != --?* || $arg == --config.* ]]; then
      [[ $arg == -- ]] && passthrough=1
      CANONICAL+=("$arg")
      continue
    fi
    name=${arg%%=*}
    name=${name:2}
    CANONICAL+=("--${name//-/_}${arg:$((${#name} + 2))}")
  done
}

# parse_common ARGS...: for $1 starting with --, the options every launcher takes:
# --config.x=y overrides (passed to ddnn_jax.main), `--` then arguments passed
# through verbatim, and --name=value / --name value for the caller's set_option.
# Sets CONSUMED to the number of arguments used.
# shellcheck disable=SC2034  # OVERRIDES, EXTRA and CONSUMED are the caller's.
parse_common() {
  CONSUMED=1
  case $1 in
    --config.*=*) OVERRIDES+=("$1") ;;
    --config.*)
      [[ $# -ge 2 && $2 != --* ]] || die "override $1 needs a value"
      OVERRIDES+=("$1=$2"); CONSUMED=2 ;;
    --) EXTRA=("${@:2}"); CONSUMED=$# ;;
    --*=*) set_option "${1%%=*}" "${1#*=}" ;;
    --*)
      if [[ $# -ge 2 && $2 != --* ]]; then
        set_option "$1" "$2"; CONSUMED=2
      else
        set_option "$1" ''  # dies: unknown option or missing value
      fi ;;
  esac
}
