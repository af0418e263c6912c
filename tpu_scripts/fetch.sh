#!/usr/bin/env bash
# Copy a run's results from a TPU worker (or from Cloud Storage) to this machine.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF_USAGE
Usage: $SCRIPT_NAME --name NAME --zone ZONE --from PATH [--to DIR] [options]
       $SCRIPT_NAME --from gs://BUCKET/PATH [--to DIR]

Copy PATH into the local directory DIR (created if missing):
  a worker path   gcloud compute tpus tpu-vm scp --recurse NAME:PATH DIR --worker=0
                  (relative paths are under the worker's home directory, e.g. jaxrl-work/runs/x)
  a gs:// path    gcloud storage cp -r gs://BUCKET/PATH DIR (no TPU name or zone needed)

Options:
  --from PATH     the run's output directory (required)
  --to DIR        local destination directory (default: results)
  --worker N      worker to copy from (default: 0; jaxrl writes outputs and logs from process 0)

$COMMON_HELP

Example:
  $SCRIPT_NAME --name jaxrl-v4 --zone us-central2-b --from jaxrl-work/runs/llama3 --to results
EOF_USAGE
}

FROM=
TO=results
WORKER=0

while (($#)); do
  case $1 in
    --from | --from=*)
      take_value "$@"
      FROM=$VALUE
      ;;
    --to | --to=*)
      take_value "$@"
      TO=$VALUE
      ;;
    --worker | --worker=*)
      take_value "$@"
      WORKER=$VALUE
      ;;
    *) parse_common_option "$@" || die "unknown option: $1 (see --help)" ;;
  esac
  shift "$SHIFT"
done

[[ -n $FROM ]] || die "missing source path: pass --from PATH (a path on the worker, or gs://...)"
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker number, got '$WORKER'"

if [[ $FROM == gs://* ]]; then
  require_gcloud
  run mkdir -p "$TO"
  run gcloud storage cp -r "$FROM" "$TO"
else
  require_location
  run mkdir -p "$TO"
  run gcloud compute tpus tpu-vm scp "$TPU_NAME:$FROM" "$TO" --worker="$WORKER" \
    "${LOCATION_FLAGS[@]}" --recurse
fi
