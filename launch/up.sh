#!/usr/bin/env bash
# Create, set up and run in one go, then watch the TPU: when it is preempted (or gone), delete it,
# create it again, set it up again and re-run the same command with --resume, up to
# MAX_RESTARTS times. Meant for spot / preemptible TPUs; works for any provisioning mode.
#
# Usage: launch/up.sh [common flags] [--run-name NAME] [--resume] [--max-restarts N]
#          [--poll-interval SECONDS] [--keep] COMMAND [--config configs/FILE.py] [--config.key=value ...]
#   --max-restarts  re-creations allowed after preemptions (default MAX_RESTARTS or 10)
#   --poll-interval seconds between state checks (default POLL_INTERVAL or 60)
#   --keep          leave the TPU running when the job ends (default: delete it, success or not)
#   Needs PROJECT, ZONE, ACCELERATOR_TYPE and BUCKET. Every run of the same NAME writes to
#   BUCKET/NAME, so the trainer resumes from its latest complete checkpoint there.

set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=steps.sh
source "$LAUNCH_DIR/steps.sh"

load_settings_file
run_name="" resume=0 keep=0
while (($#)); do
  if take_common_flag "$@"; then shift "$FLAG_SHIFT"; continue; fi
  case "$1" in
    --run-name) (($# >= 2)) || die "--run-name needs a value"; run_name="$2"; shift 2 ;;
    --run-name=*) run_name="${1#*=}"; shift ;;
    --max-restarts) (($# >= 2)) || die "--max-restarts needs a value"; MAX_RESTARTS="$2"; shift 2 ;;
    --max-restarts=*) MAX_RESTARTS="${1#*=}"; shift ;;
    --poll-interval) (($# >= 2)) || die "--poll-interval needs a value"; POLL_INTERVAL="$2"; shift 2 ;;
    --poll-interval=*) POLL_INTERVAL="${1#*=}"; shift ;;
    --resume) resume=1; shift ;;
    --keep) keep=1; shift ;;
    -h | --help) usage_from_header "$0"; exit 0 ;;
    -*) die "unknown flag: $1 (see --help; trainer flags go after the COMMAND)" ;;
    *) break ;;
  esac
done
(($#)) || die "missing COMMAND (sft, rm, dpo, grpo, ...); see --help"
finalize_settings
require_settings PROJECT ZONE ACCELERATOR_TYPE BUCKET
run_name="${run_name:-$1-$(date -u +%Y%m%d-%H%M%S)}"
build_trainer_args "$run_name" "$resume" "$@"
first_args=("${TRAINER_ARGS[@]}")
build_trainer_args "$run_name" 1 "$@"
resume_args=("${TRAINER_ARGS[@]}")

# A node in one of these states will not come back by itself: re-create it. Empty = no node.
is_lost() { [[ "$1" =~ ^(PREEMPTED|TERMINATED|STOPPED|)$ ]]; }

finish() {
  local code="$1"
  if [[ "$keep" == 0 ]]; then delete_tpu || log "warning: deleting $TPU_NAME failed; delete it with launch/delete.sh"; fi
  exit "$code"
}

# Delete, create, set up and start again with --resume. Runs in a subshell with errexit on, so
# any failing step aborts this attempt only; the watch loop then tries again.
relaunch() {
  restarts=$((restarts + 1))
  ((restarts <= MAX_RESTARTS)) || { log "giving up after $MAX_RESTARTS restarts"; finish 1; }
  log "restart $restarts/$MAX_RESTARTS: re-creating $TPU_NAME and resuming $run_name"
  local code=0
  set +e
  (
    set -e
    delete_tpu || log "delete failed (the node may already be gone); creating anyway"
    create_tpu
    setup_workers
    start_run "$run_name" "${resume_args[@]}"
  )
  code=$?
  set -e
  ((code == 0)) || log "restart $restarts failed (exit $code); checking again in ${POLL_INTERVAL}s"
}

create_tpu
setup_workers
start_run "$run_name" "${first_args[@]}"
log "run $run_name started; follow it with: launch/logs.sh --follow $run_name"

restarts=0
while true; do
  sleep_poll
  state="$(node_state)"
  if is_lost "$state"; then
    log "$TPU_NAME is ${state:-gone}"
    relaunch
    continue
  fi
  [[ "$state" == READY ]] || { log "$TPU_NAME is $state; waiting"; continue; }
  status="$(job_status "$run_name")"
  case "$status" in
    running | "") continue ;;
    missing) log "the job is not on worker 0 (a failed restart?)"; relaunch ;;
    0) log "run $run_name finished; output in $BUCKET/$run_name"; finish 0 ;;
    *)
      # A preempted job often dies (SIGTERM) a moment before the node reports PREEMPTED.
      sleep_poll
      state="$(node_state)"
      if is_lost "$state"; then
        log "$TPU_NAME is ${state:-gone}"
        relaunch
      else
        log "run $run_name failed with exit code $status on a healthy TPU; see launch/logs.sh $run_name"
        finish "$status"
      fi
      ;;
  esac
done
