# shellcheck shell=bash disable=SC2034  # settings set here are read by the scripts that source this file
# Shared by every launch script: settings, validation, and the one place gcloud is called.
#
# Settings come from (highest first): command-line flags, environment variables, then the
# settings file (LAUNCH_ENV, default launch/config.env). Every gcloud call goes through
# `gcloud_run`/`gcloud_capture`, so `--dry-run` can print the exact commands instead.

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$LAUNCH_DIR")"

# Every setting a user may give; the settings file may only set these (a typo fails loudly).
SETTING_NAMES=(PROJECT ZONE ACCELERATOR_TYPE RUNTIME_VERSION TPU_NAME BUCKET PROVISIONING QUEUED_RESOURCES
  QR_NAME QR_VALID_UNTIL INSTALL_FROM WHEEL REPO_URL GIT_REV PYTHON_VERSION REMOTE_DIR BUILD_DIR
  POLL_INTERVAL MAX_RESTARTS SSH_FLAGS DRY_RUN)

log() { printf '[launch] %s\n' "$*" >&2; }
die() { printf '[launch] error: %s\n' "$*" >&2; exit 2; }

# Read the settings file without letting it override what the environment already set:
# `PROJECT=other launch/run.sh ...` must win over a stale config.env.
load_settings_file() {
  local file="${LAUNCH_ENV:-$LAUNCH_DIR/config.env}" name line_no=0 line
  [[ -f "$file" ]] || return 0
  while IFS= read -r line || [[ -n "$line" ]]; do
    line_no=$((line_no + 1))
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    [[ "$line" =~ ^[[:space:]]*(export[[:space:]]+)?([A-Z_]+)= ]] \
      || die "$file:$line_no: expected NAME=value, got: $line"
    name="${BASH_REMATCH[2]}"
    [[ " ${SETTING_NAMES[*]} " == *" $name "* ]] \
      || die "$file:$line_no: unknown setting $name (known: ${SETTING_NAMES[*]})"
  done <"$file"
  local -A saved=()
  for name in "${SETTING_NAMES[@]}"; do [[ -v "$name" ]] && saved[$name]="${!name}"; done
  # shellcheck disable=SC1090  # the file is the user's, its path is only known at run time
  source "$file"
  for name in "${!saved[@]}"; do printf -v "$name" '%s' "${saved[$name]}"; done
}

# Parse one common flag at "$1" (value in "$2" or after '='). Sets FLAG_SHIFT to the number of
# arguments used, or returns 1 when "$1" is not a common flag so the script can try its own.
take_common_flag() {
  local flag="${1%%=*}" value var
  FLAG_SHIFT=1
  case "$flag" in
    --dry-run) DRY_RUN=1; return 0 ;;
    --queued) QUEUED_RESOURCES=1; return 0 ;;
    --no-queued) QUEUED_RESOURCES=0; return 0 ;;
    --project) var=PROJECT ;;
    --zone) var=ZONE ;;
    --accelerator-type) var=ACCELERATOR_TYPE ;;
    --runtime-version) var=RUNTIME_VERSION ;;
    --tpu-name) var=TPU_NAME ;;
    --bucket) var=BUCKET ;;
    --provisioning) var=PROVISIONING ;;
    --install-from) var=INSTALL_FROM ;;
    *) return 1 ;;
  esac
  if [[ "$1" == *=* ]]; then
    value="${1#*=}"
  else
    (($# >= 2)) || die "$flag needs a value"
    value="$2"
    FLAG_SHIFT=2
  fi
  printf -v "$var" '%s' "$value"
}

# Default TPU VM runtime per TPU generation (Cloud TPU docs, "TPU software versions").
default_runtime_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

# Fill defaults and check values that have a fixed form. Missing required settings are checked
# separately (require_settings) because each script needs a different subset.
finalize_settings() {
  # gcloud names v5e slices "v5litepod-N"; accept the marketing name too.
  if [[ "${ACCELERATOR_TYPE:-}" == v5e-* ]]; then ACCELERATOR_TYPE="v5litepod-${ACCELERATOR_TYPE#v5e-}"; fi
  if [[ -z "${RUNTIME_VERSION:-}" && -n "${ACCELERATOR_TYPE:-}" ]]; then
    RUNTIME_VERSION="$(default_runtime_version "$ACCELERATOR_TYPE")" \
      || die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set RUNTIME_VERSION (or --runtime-version)"
  fi
  if [[ -z "${TPU_NAME:-}" && -n "${ACCELERATOR_TYPE:-}" ]]; then TPU_NAME="posttrain-$ACCELERATOR_TYPE"; fi
  TPU_NAME="${TPU_NAME:-}"
  QR_NAME="${QR_NAME:-$TPU_NAME-qr}"
  PROVISIONING="${PROVISIONING:-on-demand}"
  QUEUED_RESOURCES="${QUEUED_RESOURCES:-0}"
  INSTALL_FROM="${INSTALL_FROM:-wheel}"
  PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
  REMOTE_DIR="${REMOTE_DIR:-posttrain}"
  BUILD_DIR="${BUILD_DIR:-$LAUNCH_DIR/.build}"
  POLL_INTERVAL="${POLL_INTERVAL:-60}"
  MAX_RESTARTS="${MAX_RESTARTS:-10}"
  DRY_RUN="${DRY_RUN:-0}"
  BUCKET="${BUCKET:-}"
  BUCKET="${BUCKET%/}"
  case "$PROVISIONING" in
    on-demand | spot | reserved) ;;
    preemptible) [[ "$QUEUED_RESOURCES" == 1 ]] && die "PROVISIONING=preemptible needs QUEUED_RESOURCES=0 (queued resources use spot)" ;;
    *) die "PROVISIONING=$PROVISIONING: expected on-demand, spot, reserved or preemptible" ;;
  esac
  [[ "$QUEUED_RESOURCES" =~ ^[01]$ ]] || die "QUEUED_RESOURCES=$QUEUED_RESOURCES: expected 0 or 1"
  [[ "$INSTALL_FROM" =~ ^(wheel|git)$ ]] || die "INSTALL_FROM=$INSTALL_FROM: expected wheel or git"
  [[ -z "$BUCKET" || "$BUCKET" == gs://* ]] || die "BUCKET=$BUCKET: expected a gs:// URL (e.g. gs://my-bucket)"
  [[ -z "$TPU_NAME" || "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "TPU_NAME=$TPU_NAME: lowercase letters, digits and '-', starting with a letter"
  [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS=$MAX_RESTARTS: expected a whole number"
  [[ "$POLL_INTERVAL" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "POLL_INTERVAL=$POLL_INTERVAL: expected seconds"
  # Word-split on purpose: extra ssh/scp flags such as "--internal-ip --tunnel-through-iap".
  read -r -a SSH_FLAG_LIST <<<"${SSH_FLAGS:-}"
  SCOPE=("--project=${PROJECT:-}" "--zone=${ZONE:-}")
}

# Fail before any gcloud call, naming every missing setting and where it can be given.
require_settings() {
  local name missing=()
  for name in "$@"; do [[ -n "${!name:-}" ]] || missing+=("$name"); done
  ((${#missing[@]} == 0)) && return 0
  local hint flag
  for name in "${missing[@]}"; do
    flag="--$(tr '[:upper:]_' '[:lower:]-' <<<"$name")"
    case "$name" in
      PROJECT) hint="the Google Cloud project id" ;;
      ZONE) hint="a zone with TPU capacity, e.g. us-east5-b or europe-west4-a" ;;
      ACCELERATOR_TYPE) hint="e.g. v5litepod-8, v6e-16, v5p-64" ;;
      BUCKET) hint="gs://bucket for checkpoints and metrics" ;;
      TPU_NAME) hint="the TPU VM name; defaults to posttrain-\$ACCELERATOR_TYPE when ACCELERATOR_TYPE is set" ;;
      *) hint="" ;;
    esac
    printf '[launch] error: %s is not set (%s): export %s=..., add it to %s, or pass %s\n' \
      "$name" "$hint" "$name" "${LAUNCH_ENV:-launch/config.env}" "$flag" >&2
  done
  exit 2
}

# Shell-quote one word so the printed line can be pasted back into a shell verbatim. A flag
# keeps its "--name=" outside the quotes (same word to the shell, easier to read).
quote_word() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ ^(--[a-z][a-z0-9-]*=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote_word "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_cmd() {
  local word out=()
  for word in "$@"; do out+=("$(quote_word "$word")"); done
  printf '%s\n' "${out[*]}"
}

# Dry-run lines go to the script's own stdout even from inside $(...) captures.
exec {DRY_RUN_OUT}>&1

# Run a command that changes something (gcloud or a local build step); print it under --dry-run.
run_cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then quote_cmd "$@" >&"$DRY_RUN_OUT"; return 0; fi
  "$@"
}

gcloud_run() { run_cmd gcloud "$@"; }

# Run a read-only gcloud command and print its stdout; under --dry-run print the command and
# answer "$1" instead, so loops that wait on a state end after one round.
gcloud_capture() {
  local dry_answer="$1"
  shift
  if [[ "$DRY_RUN" == 1 ]]; then
    quote_cmd gcloud "$@" >&"$DRY_RUN_OUT"
    printf '%s\n' "$dry_answer"
    return 0
  fi
  gcloud "$@" 2>/dev/null
}

# State of the TPU VM node (READY, PREEMPTED, ...), or empty when it does not exist (a preempted
# node of a queued resource can be deleted by the service itself).
node_state() {
  gcloud_capture READY compute tpus tpu-vm describe "$TPU_NAME" "${SCOPE[@]}" '--format=value(state)' || true
}

queued_resource_state() {
  gcloud_capture ACTIVE compute tpus queued-resources describe "$QR_NAME" "${SCOPE[@]}" \
    '--format=value(state.state)' || true
}

# Run one shell command line on the workers ("all" or an index) of the TPU VM.
ssh_workers() {
  local workers="$1" command="$2"
  gcloud_run compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE[@]}" "--worker=$workers" \
    --strict-host-key-checking=no "${SSH_FLAG_LIST[@]}" "--command=$command"
}

# Copy local files to REMOTE_DIR on every worker.
scp_to_all_workers() {
  gcloud_run compute tpus tpu-vm scp "$@" "$TPU_NAME:$REMOTE_DIR/" "${SCOPE[@]}" --worker=all \
    --strict-host-key-checking=no "${SSH_FLAG_LIST[@]}"
}

sleep_poll() { [[ "$DRY_RUN" == 1 ]] || sleep "$POLL_INTERVAL"; }

# Print usage from the header comment of the calling script (lines 2.. up to the first blank).
usage_from_header() {
  sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$1"
}
