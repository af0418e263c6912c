#!/usr/bin/env bash
# Install JAX for TPU and jaxrl on every worker of a TPU VM or pod slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --name NAME --zone ZONE --source SPEC [options]

Install "jax[tpu]" and jaxrl on all workers at once (gcloud compute tpus tpu-vm ssh --worker=all).
SPEC is either
  a git URL            git+https://github.com/ORG/jaxrl.git@main (a URL ending in .git gets git+),
  a package URL        https://.../jaxrl-0.1.0-py3-none-any.whl, or
  a local wheel/sdist  dist/jaxrl-0.1.0-py3-none-any.whl, copied to /tmp on every worker first
                       (build one with: python -m pip wheel --no-deps -w dist .)

Options:
  --source SPEC   what to install [JAXRL_SOURCE] (required)
  --jax SPEC      the JAX requirement [JAX_SPEC] (default: jax[tpu]; pin with e.g. 'jax[tpu]==0.6.2')
  --python BIN    interpreter on the workers [PYTHON] (default: python3; jaxrl needs >= 3.10)
  --venv DIR      install into a virtual environment DIR on each worker (relative to the home
                  directory unless absolute; needs the python3-venv package); pass the same --venv
                  to launch.sh [JAXRL_VENV]

$COMMON_HELP

Example:
  $SCRIPT_NAME --name jaxrl-v4 --zone us-central2-b --source git+https://github.com/ORG/jaxrl.git
EOF
}

JAXRL_SOURCE=${JAXRL_SOURCE:-}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
PYTHON=${PYTHON:-python3}
JAXRL_VENV=${JAXRL_VENV:-}

while (($#)); do
  case $1 in
    --source | --source=*)
      take_value "$@"
      JAXRL_SOURCE=$VALUE
      ;;
    --jax | --jax=*)
      take_value "$@"
      JAX_SPEC=$VALUE
      ;;
    --python | --python=*)
      take_value "$@"
      PYTHON=$VALUE
      ;;
    --venv | --venv=*)
      take_value "$@"
      JAXRL_VENV=$VALUE
      ;;
    *) parse_common_option "$@" || die "unknown option: $1 (see --help)" ;;
  esac
  shift "$SHIFT"
done

require_location
require "$JAXRL_SOURCE" "package source" --source JAXRL_SOURCE

# What pip on the workers installs; a local file is copied to /tmp on every worker first.
COPY=
case $JAXRL_SOURCE in
  git+*) SPEC=$JAXRL_SOURCE ;;
  *://*.whl | *://*.tar.gz | *://*.zip) SPEC=$JAXRL_SOURCE ;;
  *://*.git | *://*.git@* | git@*) SPEC=git+$JAXRL_SOURCE ;;
  *.whl | *.tar.gz | *.zip)
    [[ -f $JAXRL_SOURCE ]] || die "package file not found: $JAXRL_SOURCE"
    COPY=$JAXRL_SOURCE
    SPEC=/tmp/${JAXRL_SOURCE##*/}
    ;;
  *) die "--source must be a git URL (git+https://...), a package URL or a local .whl/.tar.gz," \
    "got '$JAXRL_SOURCE'" ;;
esac

PY=$(quote_remote "$PYTHON")
SETUP=
if [[ -n $JAXRL_VENV ]]; then
  SETUP="$PY -m venv $(remote_dir "$JAXRL_VENV") && "
  PY="$(remote_dir "$JAXRL_VENV")/bin/python"
fi
SPEC=$(quote_remote "$SPEC")
# Resolve JAX and jaxrl's dependencies together, then reinstall jaxrl itself: a rebuilt wheel with
# an unchanged version number would otherwise count as already installed.
REMOTE="${SETUP}$PY -m pip install --upgrade $(quote_remote "$JAX_SPEC") $SPEC"
REMOTE+=" && $PY -m pip install --no-deps --force-reinstall $SPEC"
REMOTE+=" && $PY -c \"import jax, jaxrl; print(jax.__version__)\""

if [[ -n $COPY ]]; then
  run gcloud compute tpus tpu-vm scp "$COPY" "$TPU_NAME:/tmp/" --worker=all "${LOCATION_FLAGS[@]}"
fi
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION_FLAGS[@]}" --worker=all --command="$REMOTE"
