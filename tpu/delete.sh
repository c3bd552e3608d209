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

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --name | --zone | --project)
      need_value "$1" "${2:-}"
      case "$1" in
        --name) TPU_NAME="$2" ;;
        --zone) ZONE="$2" ;;
        --project) PROJECT="$2" ;;
      esac
      shift
      ;;
    --yes) YES=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done

location_flags
cmd=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}")
if [[ "$YES" == 1 ]]; then
  cmd+=(--quiet)
fi
run "${cmd[@]}"
