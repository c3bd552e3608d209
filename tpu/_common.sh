# shellcheck shell=bash
# Shared by the tpu/*.sh scripts (sourced, not run): defaults, flag helpers, dry-run execution.
#
# Every default can also come from the environment (TPU_NAME, ZONE, PROJECT, ...), and every
# script accepts --dry-run: it prints each command, one per line, shell-quoted so that it can
# be pasted into a shell, instead of running it.

TPU_NAME="${TPU_NAME:-eesd-tpu}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
DRY_RUN=0

die() {
  echo "error: $*" >&2
  echo "run with --help for usage" >&2
  exit 2
}

# quote ARG: ARG as-is when it is shell-safe, else single-quoted (--flag='value' for flags).
quote() {
  local re='^[A-Za-z0-9_./=:,@%+-]+$' flag_re='^(--[A-Za-z0-9-]+=)(.*)$'
  if [[ "$1" =~ $re ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ $flag_re ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# run CMD ARGS...: print the command (dry run) or run it.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local out="" arg
    for arg in "$@"; do
      out+="$(quote "$arg") "
    done
    echo "${out% }"
  else
    "$@"
  fi
}

# The gcloud flags every TPU VM command takes.
location_flags() {
  LOCATION=("--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then
    LOCATION+=("--project=$PROJECT")
  fi
}

# need_value FLAG VALUE: fail unless a flag that takes a value got one.
need_value() {
  if [[ -z "${2:-}" || "$2" == --* ]]; then
    die "$1 needs a value"
  fi
}

# parse_flags ARGS...: set the variables the flag tables name, from `--flag VALUE`, `--flag=VALUE`
# and bare switches; --help prints the script's usage. The tables are the calling script's:
#   VALUE_FLAGS  "flag=VAR" items; "flag=VAR[]" appends to an array (a repeatable flag)
#   SWITCHES     "flag=VAR" items that set VAR=1
# --name, --zone, --project and --dry-run are everyone's. With TAKES_REST=1, the arguments after
# `--`, or from the first word that is not a flag, are left in the array REST.
parse_flags() {
  local specs=(name=TPU_NAME zone=ZONE project=PROJECT "${VALUE_FLAGS[@]}")
  local switch_specs=(dry-run=DRY_RUN "${SWITCHES[@]}")
  local arg flag value spec var matched
  REST=()
  while [[ $# -gt 0 ]]; do
    arg="$1"
    case "$arg" in
      -h | --help) usage; exit 0 ;;
      --*) ;;
      *) [[ "$arg" != -* ]] || die "unknown argument: $arg" ;;
    esac
    if [[ "${TAKES_REST:-0}" == 1 && ("$arg" == -- || "$arg" != --*) ]]; then
      [[ "$arg" != -- ]] || shift
      REST=("$@")
      return
    fi
    flag="${arg%%=*}"
    flag="${flag#--}"
    matched=0
    for spec in "${switch_specs[@]}"; do
      if [[ "$arg" == "--${spec%%=*}" ]]; then
        printf -v "${spec#*=}" 1
        matched=1
      fi
    done
    for spec in "${specs[@]}"; do
      [[ "$flag" == "${spec%%=*}" ]] || continue
      if [[ "$arg" == *=* ]]; then
        value="${arg#*=}"
      else
        need_value "$arg" "${2:-}"
        value="$2"
        shift
      fi
      var="${spec#*=}"
      if [[ "$var" == *"[]" ]]; then
        eval "${var%"[]"}+=(\"\$value\")"
      else
        printf -v "$var" '%s' "$value"
      fi
      matched=1
    done
    [[ "$matched" == 1 ]] || die "unknown argument: $arg"
    shift
  done
}
