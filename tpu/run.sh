#!/usr/bin/env bash
# Run an `eesd` command on every worker of a TPU VM / pod slice at once (--worker=all).
#
# Every host runs the same program (SPMD); EESD_DISTRIBUTED=1 makes the eesd entry point call
# jax.distributed.initialize(), which finds the other hosts from the TPU metadata. Only
# process 0 writes logs and results. Run tpu/setup.sh first.
#
#   tpu/run.sh --name eesd-tpu -- bench --mesh data=1,model=4 --max-new-tokens 128
#   tpu/run.sh -- distill --mesh data=4,model=1 --workdir runs/exit
#   tpu/run.sh --background -- distill ...   # keep running after ssh returns; output in REMOTE_DIR/eesd-run.log
#   tpu/run.sh --dry-run -- bench
set -euo pipefail
# shellcheck source=SCRIPTDIR/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

WORKER="${WORKER:-all}"
REMOTE_DIR="${REMOTE_DIR:-eesd_jax}"
BACKGROUND=0
ENVS=("EESD_DISTRIBUTED=1")
SUBCOMMANDS="bench distill eval-exit generate"

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

VALUE_FLAGS=(worker=WORKER dir=REMOTE_DIR "env=ENVS[]")
SWITCHES=(background=BACKGROUND)
TAKES_REST=1
parse_flags "$@"
set -- "${REST[@]}"

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
