#!/usr/bin/env bash
# Start one jaxrl process per host over ssh, on GPU hosts without SLURM.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tpu_scripts/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --hosts HOST0,HOST1[,...] [options] -- jaxrl COMMAND [ARGS ...]

Start the command on every host at once over ssh, one process per host using all of its GPUs.
Process i runs on the i-th host with
  JAXRL_COORDINATOR=HOST0:PORT JAXRL_NUM_PROCESSES=<number of hosts> JAXRL_PROCESS_ID=i
which jaxrl passes to jax.distributed.initialize (the config keys distributed.coordinator,
distributed.num_processes and distributed.process_id do the same from a YAML file). Run the same
line by hand on each host to do without this script. Under SLURM use slurm/jaxrl.sbatch instead.

Every host needs jaxrl installed, the same code and config at WORKDIR, passwordless ssh from here,
and the coordinator port open between the hosts. Output goes to LOG_DIR/RUN_NAME.process-i.log
here; process 0's output is also shown.

Options:
  --hosts LIST       comma-separated hosts; the first one runs process 0 and the coordinator (required)
  --port PORT        coordinator port on the first host (default: 1234)
  --workdir DIR      directory the command runs in on every host (default: this directory)
  --env KEY=VAL      set an environment variable for the command; repeatable
  --run-name NAME    names the log files (default: jaxrl-DATE-TIME)
  --log-dir DIR      local log directory (default: logs)
  --dry-run          print the ssh commands, one per line prefixed by '+ ', and run nothing
  -h, --help         show this help

Example:
  $SCRIPT_NAME --hosts gpu-a,gpu-b -- jaxrl pipeline --config configs/llama3_8b_gpu.yaml
EOF
}

HOSTS=
PORT=1234
WORKDIR=$PWD
LOG_DIR=logs
RUN_NAME=
EXPORTS=
COMMAND=()

while (($#)); do
  SHIFT=1
  case $1 in
    --hosts | --hosts=*)
      take_value "$@"
      HOSTS=$VALUE
      ;;
    --port | --port=*)
      take_value "$@"
      PORT=$VALUE
      ;;
    --workdir | --workdir=*)
      take_value "$@"
      WORKDIR=$VALUE
      ;;
    --env | --env=*)
      take_value "$@"
      [[ $VALUE =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, got '$VALUE'"
      EXPORTS+="${VALUE%%=*}=$(quote_remote "${VALUE#*=}") "
      ;;
    --run-name | --run-name=*)
      take_value "$@"
      RUN_NAME=$VALUE
      ;;
    --log-dir | --log-dir=*)
      take_value "$@"
      LOG_DIR=$VALUE
      ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      COMMAND=("$@")
      break
      ;;
    *) die "unknown option: $1 (put the jaxrl command after --)" ;;
  esac
  shift "$SHIFT"
done

[[ -n $HOSTS ]] || die "missing hosts: pass --hosts HOST0,HOST1"
[[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
((${#COMMAND[@]})) || die "missing command: give it after --, e.g. -- jaxrl pipeline --config FILE"
IFS=, read -r -a HOST_LIST <<<"$HOSTS"
RUN_NAME=${RUN_NAME:-jaxrl-$(date +%Y%m%d-%H%M%S)}
CMD=$(format_remote "${COMMAND[@]}")
NUM=${#HOST_LIST[@]}

PIDS=()
# Stop the ssh sessions started here (and with them the remote processes) on Ctrl-C.
trap 'if ((${#PIDS[@]})); then kill "${PIDS[@]}" 2>/dev/null; fi' INT TERM
if ((!DRY_RUN)); then
  mkdir -p "$LOG_DIR"
fi
for i in "${!HOST_LIST[@]}"; do
  host=${HOST_LIST[i]}
  env="JAXRL_COORDINATOR=${HOST_LIST[0]}:$PORT JAXRL_NUM_PROCESSES=$NUM JAXRL_PROCESS_ID=$i"
  remote="cd $(quote_remote "$WORKDIR") && ${EXPORTS}$env $CMD"
  log=$LOG_DIR/$RUN_NAME.process-$i.log
  if ((DRY_RUN)); then
    run ssh "$host" "$remote"
  elif ((i == 0)); then
    # A subshell, so that waiting on it gives ssh's status (pipefail) rather than tee's.
    (run ssh "$host" "$remote" 2>&1 | tee "$log") &
    PIDS+=("$!")
  else
    echo "$SCRIPT_NAME: process $i on $host logs to $log" >&2
    run ssh "$host" "$remote" >"$log" 2>&1 &
    PIDS+=("$!")
  fi
done

status=0
if ((${#PIDS[@]})); then
  for pid in "${PIDS[@]}"; do
    wait "$pid" || status=1
  done
fi
if ((status)); then
  fail "at least one process failed; see the logs in $LOG_DIR/$RUN_NAME.process-*.log"
fi
