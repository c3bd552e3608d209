#!/usr/bin/env bash
# Create a Cloud TPU VM (one host, e.g. v4-8) or a pod slice (several hosts, e.g. v4-32).
#
#   tpu/create.sh --name eesd-tpu --zone us-central2-b --accelerator-type v4-8
#   tpu/create.sh --accelerator-type v5litepod-16 --zone us-west4-a --version v2-alpha-tpuv5-lite --spot
#   tpu/create.sh --dry-run      # print the gcloud command instead of running it
set -euo pipefail
# shellcheck source=SCRIPTDIR/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
SPOT=0

usage() {
  cat <<USAGE
usage: tpu/create.sh [--name NAME] [--zone ZONE] [--project PROJECT]
                     [--accelerator-type TYPE] [--version RUNTIME] [--spot] [--dry-run]

  --name              TPU VM name (default: $TPU_NAME)
  --zone              zone (default: $ZONE)
  --project           GCP project (default: gcloud's configured project)
  --accelerator-type  TPU type and size, e.g. v4-8, v4-32, v5litepod-8 (default: $ACCELERATOR_TYPE)
  --version           TPU VM runtime version (default: $VERSION)
  --spot              create a Spot (preemptible) TPU
  --dry-run           print the command instead of running it
USAGE
}

VALUE_FLAGS=(accelerator-type=ACCELERATOR_TYPE version=VERSION)
SWITCHES=(spot=SPOT)
parse_flags "$@"

location_flags
cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}"
  "--accelerator-type=$ACCELERATOR_TYPE" "--version=$VERSION")
if [[ "$SPOT" == 1 ]]; then
  cmd+=(--spot)
fi
run "${cmd[@]}"
