# shellcheck shell=bash
# Variables set here are read by the scripts that source this file.
# shellcheck disable=SC2034
# Helpers shared by the tpu_scripts (sourced, never run on its own): flag parsing, the TPU settings
# that every script reads from flags or the environment, and `run`, which honours --dry-run.

SCRIPT_NAME=${0##*/}
DRY_RUN=0

# Settings shared by every script; a flag overrides the environment variable of the same meaning.
TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}

# Set by take_value: the option's value and how many words the option used (1 for --flag=VALUE).
VALUE=
SHIFT=1

die() {
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 2
}

fail() {
  echo "$SCRIPT_NAME: $*" >&2
  exit 1
}

# Read the value of "--flag VALUE" or "--flag=VALUE" from the arguments "$@" (starting at the flag).
take_value() {
  if [[ $1 == *=* ]]; then
    VALUE=${1#*=}
    SHIFT=1
  elif (($# >= 2)); then
    VALUE=$2
    SHIFT=2
  else
    die "$1 needs a value"
  fi
}

# Handle an option every script accepts; return 1 (without shifting) when "$1" is not one of them.
parse_common_option() {
  SHIFT=1
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) DRY_RUN=1 ;;
    --name | --name=*)
      take_value "$@"
      TPU_NAME=$VALUE
      ;;
    --zone | --zone=*)
      take_value "$@"
      ZONE=$VALUE
      ;;
    --project | --project=*)
      take_value "$@"
      PROJECT=$VALUE
      ;;
    *) return 1 ;;
  esac
}

COMMON_HELP="Common options (flags override the environment variables in brackets):
  --name NAME        TPU VM / slice name [TPU_NAME] (required)
  --zone ZONE        zone, e.g. us-central2-b [ZONE] (required)
  --project PROJECT  Google Cloud project [PROJECT] (default: gcloud's configured project)
  --dry-run          print the commands, one per line prefixed by '+ ', and run nothing
  -h, --help         show this help"

# Exit with a message naming the missing setting and both ways to give it.
require() {
  local value=$1 what=$2 flag=$3 env=$4
  [[ -n $value ]] || die "missing $what: pass $flag or set $env"
}

# Check the settings every gcloud call needs and build the location flags that go with each.
require_location() {
  require "$TPU_NAME" "TPU name" --name TPU_NAME
  require "$ZONE" "zone" --zone ZONE
  LOCATION_FLAGS=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then
    LOCATION_FLAGS+=(--project="$PROJECT")
  fi
  require_gcloud
}

require_gcloud() {
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null; then
    fail "gcloud not found on PATH: install the Google Cloud CLI" \
      "(https://cloud.google.com/sdk/docs/install)"
  fi
}

# A directory on the workers as the remote shell should write it: relative paths are under $HOME
# (where gcloud's ssh starts), so they stay right after a `cd`.
remote_dir() {
  if [[ $1 == /* ]]; then
    quote_remote "$1"
  else
    # shellcheck disable=SC2016  # $HOME is expanded on the worker
    printf '"$HOME"/%s' "$(quote_remote "$1")"
  fi
}

# A word a shell reads back unchanged; bare when safe, else single-quoted.
quote_word() {
  local word=$1 safe='^[A-Za-z0-9_./:=@,+%^-]+$'
  if [[ $word =~ $safe ]]; then
    printf '%s' "$word"
  elif [[ $word == --*=* && ${word%%=*} =~ $safe ]]; then
    # --flag='value with spaces' reads better than '--flag=value with spaces'.
    printf '%s=' "${word%%=*}"
    quote_word "${word#*=}"
  elif [[ $word != *\'* ]]; then
    printf "'%s'" "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Like quote_word, but prefers double quotes: for words inside a command string that is itself
# shown single-quoted (gcloud ... --command='...').
quote_remote() {
  local word=$1 safe='^[A-Za-z0-9_./:=@,+%^-]+$'
  if [[ $word =~ $safe ]]; then
    printf '%s' "$word"
  elif [[ $word != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$word"
  else
    quote_word "$word"
  fi
}

# The words "$@" as one line of shell.
format_command() {
  local out=() word
  for word in "$@"; do
    out+=("$(quote_word "$word")")
  done
  printf '%s\n' "${out[*]}"
}

# The words "$@" as one line of shell for a command string (quote_remote style).
format_remote() {
  local out=() word
  for word in "$@"; do
    out+=("$(quote_remote "$word")")
  done
  printf '%s\n' "${out[*]}"
}

# Run a command, or with --dry-run print it. Real runs echo the command to stderr first.
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(format_command "$@")"
  else
    printf '+ %s\n' "$(format_command "$@")" >&2
    "$@"
  fi
}
