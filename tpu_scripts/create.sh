#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice, directly or through a queued resource.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --name NAME --zone ZONE --accelerator-type TYPE [options]

Create a TPU VM or pod slice:
  gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE --version=RUNTIME [--spot]
With --queued, request it as a queued resource (waits in line for capacity) and wait until the
request is ACTIVE:
  gcloud compute tpus queued-resources create ID --node-id=NAME --zone=ZONE ...

Options:
  --accelerator-type TYPE   e.g. v4-32, v5litepod-16, v5p-8, v6e-8 [ACCELERATOR_TYPE] (required)
  --runtime-version VERSION TPU software version [RUNTIME_VERSION]; default by TPU generation:
                            v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                            v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot                    Spot capacity: much cheaper, may be preempted at any time
  --queued                  use a queued resource instead of creating the VM directly
  --queued-resource ID      queued resource id [QUEUED_RESOURCE] (default: the TPU name)
  --valid-until DURATION    with --queued: give up if not provisioned within DURATION (e.g. 6h)
  --no-wait                 with --queued: return once the request is made
  --wait-timeout SECONDS    with --queued: stop waiting after SECONDS (default 0: no limit)
  --poll-interval SECONDS   with --queued: seconds between state checks (default 30)

$COMMON_HELP

Example:
  $SCRIPT_NAME --name jaxrl-v4 --zone us-central2-b --accelerator-type v4-32 --queued --spot
EOF
}

ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
QUEUED_RESOURCE=${QUEUED_RESOURCE:-}
SPOT=0
QUEUED=0
WAIT=1
VALID_UNTIL=
WAIT_TIMEOUT=0
POLL_INTERVAL=30

while (($#)); do
  case $1 in
    --accelerator-type | --accelerator-type=*)
      take_value "$@"
      ACCELERATOR_TYPE=$VALUE
      ;;
    --runtime-version | --runtime-version=*)
      take_value "$@"
      RUNTIME_VERSION=$VALUE
      ;;
    --queued-resource | --queued-resource=*)
      take_value "$@"
      QUEUED_RESOURCE=$VALUE
      ;;
    --valid-until | --valid-until=*)
      take_value "$@"
      VALID_UNTIL=$VALUE
      ;;
    --wait-timeout | --wait-timeout=*)
      take_value "$@"
      WAIT_TIMEOUT=$VALUE
      ;;
    --poll-interval | --poll-interval=*)
      take_value "$@"
      POLL_INTERVAL=$VALUE
      ;;
    --spot) SHIFT=1 SPOT=1 ;;
    --queued) SHIFT=1 QUEUED=1 ;;
    --no-wait) SHIFT=1 WAIT=0 ;;
    *) parse_common_option "$@" || die "unknown option: $1 (see --help)" ;;
  esac
  shift "$SHIFT"
done

require_location
require "$ACCELERATOR_TYPE" "accelerator type" --accelerator-type ACCELERATOR_TYPE
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || die "--wait-timeout must be whole seconds, got '$WAIT_TIMEOUT'"
[[ $POLL_INTERVAL =~ ^[0-9]+$ ]] || die "--poll-interval must be whole seconds, got '$POLL_INTERVAL'"

if [[ -z $RUNTIME_VERSION ]]; then
  case $ACCELERATOR_TYPE in
    v2-* | v3-* | v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) die "missing runtime version (no default for $ACCELERATOR_TYPE):" \
      "pass --runtime-version or set RUNTIME_VERSION" ;;
  esac
fi

# Poll the queued resource until it is ACTIVE; stop on a state it cannot leave for ACTIVE.
wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE"
    "${LOCATION_FLAGS[@]}" --format='value(state.state)')
  if ((DRY_RUN)); then
    run "${describe[@]}"
    return
  fi
  local state waited=0 errors=0
  while :; do
    # Ride out a few transient gcloud errors; give up on a persistent one (e.g. a wrong name).
    if state=$("${describe[@]}"); then
      errors=0
    elif ((++errors >= 5)); then
      fail "could not read the state of queued resource $QUEUED_RESOURCE (5 tries)"
    fi
    case $state in
      ACTIVE)
        echo "$SCRIPT_NAME: queued resource $QUEUED_RESOURCE is ACTIVE; TPU $TPU_NAME is ready" >&2
        return
        ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        fail "queued resource $QUEUED_RESOURCE is $state; details:" \
          "$(format_command "${describe[@]:0:6}" "${LOCATION_FLAGS[@]}")"
        ;;
    esac
    if ((WAIT_TIMEOUT > 0 && waited >= WAIT_TIMEOUT)); then
      fail "queued resource $QUEUED_RESOURCE still ${state:-unknown} after ${WAIT_TIMEOUT}s;" \
        "the request stays in the queue until teardown.sh --queued deletes it"
    fi
    echo "$SCRIPT_NAME: queued resource $QUEUED_RESOURCE is ${state:-unknown};" \
      "checking again in ${POLL_INTERVAL}s" >&2
    sleep "$POLL_INTERVAL"
    waited=$((waited + POLL_INTERVAL))
  done
}

if ((QUEUED)); then
  QUEUED_RESOURCE=${QUEUED_RESOURCE:-$TPU_NAME}
  cmd=(gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME"
    "${LOCATION_FLAGS[@]}" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
  if ((SPOT)); then cmd+=(--spot); fi
  if [[ -n $VALID_UNTIL ]]; then cmd+=(--valid-until-duration="$VALID_UNTIL"); fi
  run "${cmd[@]}"
  if ((WAIT)); then
    wait_until_active
  fi
else
  [[ -z $VALID_UNTIL ]] || die "--valid-until needs --queued"
  cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION_FLAGS[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  if ((SPOT)); then cmd+=(--spot); fi
  run "${cmd[@]}"
fi
