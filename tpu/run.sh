#!/usr/bin/env bash
# Run an `eesd` command on every worker of a TPU VM / pod slice at once (--worker=all).
#
# Every host runs the same program (SPMD); EESD_DISTRIBUTED=1 makes the eesd entry point call
# jax.distributed.initialize(), which finds the other hosts from the TPU metadata. Only
# process 0 writes logs and results. Run tpu/setup.sh first.
#
#   tpu/run.sh --name eesd-tpu -- bench --mesh data=1,model=4 --max-new-tokens 128
#   tpu/run.sh -- distill --mesh data=4,model=1 --out runs/exit
#   tpu/run.sh --background -- distill ...   # keep running after ssh returns; output in REMOTE_DIR/eesd-run.log
#   tpu/run.sh --dry-run -- bench
set -euo pipefail
# shellcheck source=SCRIPTDIR/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

WORKER="${WORKER:-all}"
REMOTE_DIR="${REMOTE_DIR:-eesd_jax}"
BACKGROUND=0
ENVS=("EESD_DISTRIBUTED=1")
SUBCOMMANDS="bench distill generate"

usage() {
  cat <<USAGE
usage: tpu/run.sh [--name NAME] [--zone ZONE] [--project PROJECT] [--worker all|N] [--dir REMOTE_DIR]
                  [--env KEY=VALUE]... [--background] [--dry-run] [--] {${SUBCOMMANDS// /|}} [EESD ARGS...]

  --name        TPU VM name (default: $TPU_NAME)
  --zone        zone (default: $ZONE)
  --project     GCP project (default: gcloud's configured project)
  --worker      which workers (default: $WORKER; a single worker only for debugging, the
                other hosts of a slice are needed for the program to start)
  --dir         checkout directory on the workers, relative to home (default: $REMOTE_DIR)
  --env         extra environment for the run, e.g. --env XLA_FLAGS=... (repeatable)
  --background  detach with nohup; output goes to REMOTE_DIR/eesd-run.log on each worker
  --dry-run     print the command instead of running it
  everything from the subcommand on is passed to \`eesd\` unchanged
USAGE
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --worker=*) WORKER="${1#*=}" ;;
    --dir=*) REMOTE_DIR="${1#*=}" ;;
    --env=*) ENVS+=("${1#*=}") ;;
    --name | --zone | --project | --worker | --dir | --env)
      need_value "$1" "${2:-}"
      case "$1" in
        --name) TPU_NAME="$2" ;;
        --zone) ZONE="$2" ;;
        --project) PROJECT="$2" ;;
        --worker) WORKER="$2" ;;
        --dir) REMOTE_DIR="$2" ;;
        --env) ENVS+=("$2") ;;
      esac
      shift
      ;;
    --background) BACKGROUND=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown argument: $1" ;;
    *) break ;;
  esac
  shift
done

if [[ $# -eq 0 ]]; then
  die "no eesd subcommand given (one of: $SUBCOMMANDS)"
fi
if [[ " $SUBCOMMANDS " != *" $1 "* ]]; then
  die "unsupported eesd subcommand '$1' (one of: $SUBCOMMANDS)"
fi
for kv in "${ENVS[@]}"; do
  if [[ ! "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
    die "--env wants KEY=VALUE, got '$kv'"
  fi
done

program="env"
for kv in "${ENVS[@]}"; do
  program+=" $(quote "$kv")"
done
program+=" .venv/bin/eesd"
for arg in "$@"; do
  program+=" $(quote "$arg")"
done
if [[ "$BACKGROUND" == 1 ]]; then
  remote="cd $(quote "$REMOTE_DIR") && nohup $program > eesd-run.log 2>&1 < /dev/null &"
else
  remote="cd $(quote "$REMOTE_DIR") && $program"
fi

location_flags
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" "--worker=$WORKER" "--command=$remote"
