#!/usr/bin/env bash
# Run one jaxrl command on every worker of a TPU VM or pod slice at once.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --name NAME --zone ZONE [options] -- jaxrl COMMAND [ARGS ...]

Start the command on all workers at once (gcloud compute tpus tpu-vm ssh --worker=all); every
worker must run it for the slice's jax.distributed start-up to finish. Each worker writes its output
to WORKDIR/LOG_DIR/RUN_NAME.worker-N.log on its own disk; worker 0's output is also streamed back here.

Paths in the jaxrl command are read on the workers, relative to WORKDIR. Data and checkpoint paths
may be gs://BUCKET/... : jaxrl's orbax checkpoints read and write Cloud Storage directly, so a run on
a pod can save to and resume from a bucket (the TPU's service account needs write access to it).

Options:
  --workdir DIR      directory the command runs in, relative to the home directory unless absolute
                     (default: jaxrl-work)
  --copy PATH        copy a local file or directory (e.g. configs) into WORKDIR on every worker
                     before starting; repeatable
  --env KEY=VAL      set an environment variable for the command; repeatable
  --venv DIR         the virtual environment given to install.sh [JAXRL_VENV]
  --run-name NAME    names the log files (default: jaxrl-DATE-TIME)
  --log-dir DIR      log directory, relative to WORKDIR (default: logs)
  --detach           start in the background with nohup and return; the run then survives a dropped
                     connection (without it, closing this ssh session stops the run)

$COMMON_HELP

Example:
  $SCRIPT_NAME --name jaxrl-v4 --zone us-central2-b --copy configs \\
    -- jaxrl pipeline --config configs/llama3_8b_tpu.yaml --output gs://BUCKET/runs/llama3
EOF
}

WORKDIR=jaxrl-work
LOG_DIR=logs
RUN_NAME=
JAXRL_VENV=${JAXRL_VENV:-}
DETACH=0
COPIES=()
EXPORTS=
COMMAND=()

while (($#)); do
  case $1 in
    --workdir | --workdir=*)
      take_value "$@"
      WORKDIR=$VALUE
      ;;
    --copy | --copy=*)
      take_value "$@"
      [[ -e $VALUE ]] || die "--copy: no such file or directory: $VALUE"
      COPIES+=("$VALUE")
      ;;
    --env | --env=*)
      take_value "$@"
      [[ $VALUE =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, got '$VALUE'"
      EXPORTS+="export ${VALUE%%=*}=$(quote_remote "${VALUE#*=}"); "
      ;;
    --venv | --venv=*)
      take_value "$@"
      JAXRL_VENV=$VALUE
      ;;
    --run-name | --run-name=*)
      take_value "$@"
      RUN_NAME=$VALUE
      ;;
    --log-dir | --log-dir=*)
      take_value "$@"
      LOG_DIR=$VALUE
      ;;
    --detach) SHIFT=1 DETACH=1 ;;
    --)
      shift
      COMMAND=("$@")
      break
      ;;
    *) parse_common_option "$@" || die "unknown option: $1 (put the jaxrl command after --)" ;;
  esac
  shift "$SHIFT"
done

require_location
((${#COMMAND[@]})) || die "missing command: give it after --, e.g. -- jaxrl pipeline --config FILE"
RUN_NAME=${RUN_NAME:-jaxrl-$(date +%Y%m%d-%H%M%S)}

CMD=$(format_remote "${COMMAND[@]}")
# shellcheck disable=SC2016  # $HOME is expanded on the worker
BIN_DIRS='"$HOME"/.local/bin'
if [[ -n $JAXRL_VENV ]]; then
  BIN_DIRS="$(remote_dir "$JAXRL_VENV")/bin:$BIN_DIRS"
fi
WORKER_ID_URL=http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number
LOG="$(quote_remote "$LOG_DIR")/$(quote_remote "$RUN_NAME").worker-\$w.log"

# The script each worker runs: its worker number comes from the TPU VM metadata server.
REMOTE="set -o pipefail; export PATH=$BIN_DIRS:\"\$PATH\"; ${EXPORTS}"
WD=$(remote_dir "$WORKDIR")
REMOTE+="mkdir -p $WD && cd $WD && mkdir -p $(quote_remote "$LOG_DIR") || exit 1; "
REMOTE+="w=\$(curl -sf -H Metadata-Flavor:Google $WORKER_ID_URL || hostname); log=$LOG; "
if ((DETACH)); then
  REMOTE+="nohup $CMD >\"\$log\" 2>&1 </dev/null & "
  REMOTE+="echo \"worker \$w: started pid \$! logging to \$PWD/\$log\""
else
  REMOTE+="echo \"worker \$w: logging to \$PWD/\$log\"; "
  REMOTE+="if [ \"\$w\" = 0 ]; then $CMD 2>&1 | tee \"\$log\"; else $CMD >\"\$log\" 2>&1; fi"
fi

if ((${#COPIES[@]})); then
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION_FLAGS[@]}" --worker=all \
    --command="mkdir -p $WD"
  for path in "${COPIES[@]}"; do
    run gcloud compute tpus tpu-vm scp "$path" "$TPU_NAME:$WORKDIR/" --worker=all \
      "${LOCATION_FLAGS[@]}" --recurse
  done
fi
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION_FLAGS[@]}" --worker=all --command="$REMOTE"

if ((DETACH && !DRY_RUN)); then
  echo "$SCRIPT_NAME: started; follow worker 0 with:" >&2
  echo "  $(format_command gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION_FLAGS[@]}" --worker=0 \
    --command="tail -f $WORKDIR/$LOG_DIR/$RUN_NAME.worker-0.log")" >&2
fi
