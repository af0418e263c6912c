#!/usr/bin/env bash
# Delete a TPU VM or pod slice, or the queued resource that holds it.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF_USAGE
Usage: $SCRIPT_NAME --name NAME --zone ZONE [--queued [--queued-resource ID]] [options]

Delete the TPU without asking (--quiet). Billing stops only once this succeeds; fetch results first.
  gcloud compute tpus tpu-vm delete NAME --zone=ZONE --quiet
With --queued (the TPU was made by create.sh --queued), delete the queued resource and its TPU:
  gcloud compute tpus queued-resources delete ID --zone=ZONE --force --quiet

Options:
  --queued                the TPU belongs to a queued resource
  --queued-resource ID    queued resource id [QUEUED_RESOURCE] (default: the TPU name)
  --async                 return without waiting for the deletion to finish

$COMMON_HELP

Example:
  $SCRIPT_NAME --name jaxrl-v4 --zone us-central2-b --queued
EOF_USAGE
}

QUEUED=0
ASYNC=0
QUEUED_RESOURCE=${QUEUED_RESOURCE:-}

while (($#)); do
  case $1 in
    --queued-resource | --queued-resource=*)
      take_value "$@"
      QUEUED_RESOURCE=$VALUE
      ;;
    --queued) SHIFT=1 QUEUED=1 ;;
    --async) SHIFT=1 ASYNC=1 ;;
    *) parse_common_option "$@" || die "unknown option: $1 (see --help)" ;;
  esac
  shift "$SHIFT"
done

require_location

if ((QUEUED)); then
  # --force also deletes the TPU the queued resource holds.
  cmd=(gcloud compute tpus queued-resources delete "${QUEUED_RESOURCE:-$TPU_NAME}"
    "${LOCATION_FLAGS[@]}" --force --quiet)
else
  cmd=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION_FLAGS[@]}" --quiet)
fi
if ((ASYNC)); then cmd+=(--async); fi
run "${cmd[@]}"
