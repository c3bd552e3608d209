#!/usr/bin/env bash
# Delete a Cloud TPU VM or pod slice (gcloud asks for confirmation unless --yes).
#
#   tpu/delete.sh --name eesd-tpu --zone us-central2-b
#   tpu/delete.sh --dry-run
set -euo pipefail
# shellcheck source=SCRIPTDIR/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

YES=0

usage() {
  cat <<USAGE
usage: tpu/delete.sh [--name NAME] [--zone ZONE] [--project PROJECT] [--yes] [--dry-run]

  --name     TPU VM name (default: $TPU_NAME)
  --zone     zone (default: $ZONE)
  --project  GCP project (default: gcloud's configured project)
  --yes      don't ask for confirmation (gcloud --quiet)
  --dry-run  print the command instead of running it
USAGE
}

VALUE_FLAGS=()
SWITCHES=(yes=YES)
parse_flags "$@"

location_flags
cmd=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}")
if [[ "$YES" == 1 ]]; then
  cmd+=(--quiet)
fi
run "${cmd[@]}"
