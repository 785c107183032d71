#!/usr/bin/env bash
# Run `posttrain-jax COMMAND ...` on every worker (--worker=all), detached, then follow worker 0.
#
# Usage: launch/run.sh [common flags] [--run-name NAME] [--detach] [--resume] \
#          COMMAND [--config configs/FILE.py] [--config.key=value ...]
#   Every worker runs: posttrain-jax COMMAND --config FILE --config.output_dir=BUCKET/NAME [overrides]
#   from $REMOTE_DIR (default ~/posttrain), with its output in ~/posttrain/runs/NAME/log.txt.
#   The job is started with nohup: Ctrl-C (or a dropped connection) stops only the log stream.
#   --run-name NAME  default COMMAND-YYYYMMDD-HHMMSS (UTC); reuse it with --resume to continue
#   --detach         start the job and return without streaming the log (see launch/logs.sh)
#   --resume         continue from the latest checkpoint in BUCKET/NAME
#   Needs PROJECT, ZONE, BUCKET and TPU_NAME (or ACCELERATOR_TYPE).

set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=steps.sh
source "$LAUNCH_DIR/steps.sh"

load_settings_file
run_name="" detach=0 resume=0
while (($#)); do
  if take_common_flag "$@"; then shift "$FLAG_SHIFT"; continue; fi
  case "$1" in
    --run-name) (($# >= 2)) || die "--run-name needs a value"; run_name="$2"; shift 2 ;;
    --run-name=*) run_name="${1#*=}"; shift ;;
    --detach) detach=1; shift ;;
    --resume) resume=1; shift ;;
    -h | --help) usage_from_header "$0"; exit 0 ;;
    -*) die "unknown flag: $1 (see --help; trainer flags go after the COMMAND)" ;;
    *) break ;;
  esac
done
(($#)) || die "missing COMMAND (sft, rm, dpo, grpo, ...); see --help"
finalize_settings
require_settings PROJECT ZONE BUCKET TPU_NAME
run_name="${run_name:-$1-$(date -u +%Y%m%d-%H%M%S)}"
build_trainer_args "$run_name" "$resume" "$@"

start_run "$run_name" "${TRAINER_ARGS[@]}"
log "run $run_name: output in $BUCKET/$run_name; logs on each worker in $REMOTE_DIR/runs/$run_name/log.txt"
if [[ "$detach" == 1 ]]; then
  log "detached; follow it with: launch/logs.sh --follow $run_name"
  exit 0
fi
log "streaming worker 0 (Ctrl-C stops the stream, not the job)"
follow_log 0 "$run_name"
