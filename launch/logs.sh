#!/usr/bin/env bash
# Print (or follow) a run's log from the workers.
#
# Usage: launch/logs.sh [common flags] [--worker N|all] [--follow] [RUN_NAME]
#   RUN_NAME    default: the latest run started on the VM
#   --worker    which worker's log (default 0; "all" prints every worker's log)
#   --follow    stream until the job ends, then exit with the job's exit code

set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=steps.sh
source "$LAUNCH_DIR/steps.sh"

load_settings_file
worker=0 follow=0 run_name=latest
while (($#)); do
  if take_common_flag "$@"; then shift "$FLAG_SHIFT"; continue; fi
  case "$1" in
    --worker) (($# >= 2)) || die "--worker needs a value"; worker="$2"; shift 2 ;;
    --worker=*) worker="${1#*=}"; shift ;;
    --follow | -f) follow=1; shift ;;
    -h | --help) usage_from_header "$0"; exit 0 ;;
    -*) die "unknown flag: $1 (see --help)" ;;
    *) run_name="$1"; shift ;;
  esac
done
[[ "$worker" =~ ^([0-9]+|all)$ ]] || die "--worker $worker: expected a worker index or 'all'"
[[ "$run_name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "RUN_NAME=$run_name: use letters, digits, '.', '_' and '-'"
finalize_settings
require_settings PROJECT ZONE TPU_NAME
if [[ "$follow" == 1 ]]; then
  follow_log "$worker" "$run_name"
else
  fetch_log "$worker" "$run_name"
fi
