# shellcheck shell=bash
# The TPU lifecycle steps every script is made of: create, setup, start a run, watch it, delete.
# Sourced after lib.sh; each function reads the finalized settings.
#
# Worker layout (relative to the login home, the same on every worker):
#   $REMOTE_DIR/venv                  Python venv with posttrain_jax[tpu]
#   $REMOTE_DIR/configs               the repo's configs/ (so --config paths match a local checkout)
#   $REMOTE_DIR/runs/RUN/log.txt      the job's stdout+stderr on that worker
#   $REMOTE_DIR/runs/RUN/exit_code    written when the job ends; its absence means "still running"
#   $REMOTE_DIR/runs/latest -> RUN

provisioning_flags() {
  case "$PROVISIONING" in
    spot) echo --spot ;;
    reserved) echo --reserved ;;
    preemptible) echo --preemptible ;;
  esac
}

# Create the TPU VM. With queued resources, gcloud returns once the request is queued, so wait
# until it is ACTIVE (the VM exists and can be reached) before anyone tries to ssh.
create_tpu() {
  local mode_flags=()
  read -r -a mode_flags <<<"$(provisioning_flags)"
  if [[ "$QUEUED_RESOURCES" == 1 ]]; then
    local extra=()
    [[ -n "${QR_VALID_UNTIL:-}" ]] && extra+=("--valid-until-duration=$QR_VALID_UNTIL")
    log "requesting queued resource $QR_NAME (node $TPU_NAME, $ACCELERATOR_TYPE, $PROVISIONING)"
    gcloud_run compute tpus queued-resources create "$QR_NAME" "${SCOPE[@]}" "--node-id=$TPU_NAME" \
      "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$RUNTIME_VERSION" "${mode_flags[@]}" "${extra[@]}"
    wait_until_active
  else
    log "creating TPU VM $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION, $PROVISIONING)"
    gcloud_run compute tpus tpu-vm create "$TPU_NAME" "${SCOPE[@]}" "--accelerator-type=$ACCELERATOR_TYPE" \
      "--version=$RUNTIME_VERSION" "${mode_flags[@]}"
  fi
}

# A queued request can wait hours for capacity; poll rather than hold a connection open.
wait_until_active() {
  local state unseen=0
  while true; do
    state="$(queued_resource_state)"
    case "$state" in
      ACTIVE) log "queued resource $QR_NAME is ACTIVE"; return 0 ;;
      FAILED | SUSPENDED | SUSPENDING)
        die "queued resource $QR_NAME is $state; see: gcloud compute tpus queued-resources describe $QR_NAME ${SCOPE[*]}" ;;
      "")
        unseen=$((unseen + 1))
        ((unseen < 10)) || die "queued resource $QR_NAME not found after 10 polls (check PROJECT, ZONE and quota)" ;;
      *) unseen=0 ;;
    esac
    log "queued resource $QR_NAME: ${state:-not visible yet}; next check in ${POLL_INTERVAL}s"
    sleep_poll
  done
}

delete_tpu() {
  if [[ "$QUEUED_RESOURCES" == 1 ]]; then
    # --force deletes the node first; without it a queued resource with a live node cannot go.
    gcloud_run compute tpus queued-resources delete "$QR_NAME" "${SCOPE[@]}" --force --quiet
  else
    gcloud_run compute tpus tpu-vm delete "$TPU_NAME" "${SCOPE[@]}" --quiet
  fi
}

# The wheel of the local checkout: WHEEL if given, else built into BUILD_DIR. Its name is fixed by
# pyproject.toml, so a dry run can print the same scp command a real run will execute.
local_wheel() {
  if [[ -n "${WHEEL:-}" ]]; then
    [[ -f "$WHEEL" ]] || die "WHEEL=$WHEEL does not exist"
    echo "$WHEEL"
    return 0
  fi
  local version python=python3
  version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO_DIR/pyproject.toml" | head -n 1)"
  [[ -n "$version" ]] || die "$REPO_DIR/pyproject.toml: no version = \"...\" line"
  [[ -x "$REPO_DIR/.venv/bin/python" ]] && python="$REPO_DIR/.venv/bin/python"
  log "building the wheel of $REPO_DIR into $BUILD_DIR"
  # Build from a fresh copy: setuptools reuses an in-tree build/ directory, so a module deleted
  # from the checkout would otherwise still ship in the wheel.
  local source="$BUILD_DIR/source"
  run_cmd rm -rf "$source"
  run_cmd mkdir -p "$source"
  run_cmd cp -R "$REPO_DIR/pyproject.toml" "$REPO_DIR/README.md" "$REPO_DIR/posttrain_jax" "$source/"
  run_cmd "$python" -m pip wheel --quiet --no-deps --wheel-dir "$BUILD_DIR" "$source" >&2
  local wheel="$BUILD_DIR/posttrain_jax-$version-py3-none-any.whl"
  [[ "$DRY_RUN" == 1 || -f "$wheel" ]] || die "the build did not produce $wheel"
  echo "$wheel"
}

# In git mode every worker installs exactly `git rev-parse HEAD` of this checkout, so the code that
# runs is the commit you name, not whatever a branch points to by the time a worker fetches it.
resolve_git_revision() {
  GIT_REV="${GIT_REV:-$(git -C "$REPO_DIR" rev-parse HEAD)}"
  if [[ -z "${REPO_URL:-}" ]]; then
    REPO_URL="$(git -C "$REPO_DIR" remote get-url origin 2>/dev/null)" \
      || die "INSTALL_FROM=git needs REPO_URL (no 'origin' remote in $REPO_DIR)"
  fi
  if [[ -n "$(git -C "$REPO_DIR" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    log "warning: uncommitted changes in $REPO_DIR are not installed in git mode (use INSTALL_FROM=wheel)"
  fi
  if [[ -z "$(git -C "$REPO_DIR" branch -r --contains "$GIT_REV" 2>/dev/null)" ]]; then
    log "warning: $GIT_REV is on no remote-tracking branch; push it or the workers cannot fetch it"
  fi
}

# Same venv and same package on every worker. TPU VM images ship an old system Python, so the
# venv's Python comes from uv (PYTHON_VERSION), installed per user with the system pip.
setup_workers() {
  local dir target prepare
  dir="$(quote_word "$REMOTE_DIR")"
  if [[ "$INSTALL_FROM" == wheel ]]; then
    local wheel
    wheel="$(local_wheel)"
    log "installing $(basename "$wheel") on every worker of $TPU_NAME"
    ssh_workers all "rm -rf $dir/configs $dir/*.whl && mkdir -p $dir/runs"
    scp_to_all_workers --recurse "$wheel" "$REPO_DIR/configs"
    target="$REMOTE_DIR/$(basename "$wheel")[tpu]"
    prepare=""
  else
    resolve_git_revision
    log "installing $GIT_REV of $REPO_URL on every worker of $TPU_NAME"
    local url rev
    url="$(quote_word "$REPO_URL")"
    rev="$(quote_word "$GIT_REV")"
    prepare="mkdir -p $dir/runs && { test -d $dir/src/.git || git clone --quiet $url $dir/src; }"
    prepare+=" && git -C $dir/src fetch --quiet $url && git -C $dir/src checkout --quiet --detach $rev"
    prepare+=" && rm -rf $dir/configs && ln -s src/configs $dir/configs"
    target="$REMOTE_DIR/src[tpu]"
  fi
  local python="$dir/venv/bin/python"
  # Newer images mark the system Python as externally managed (PEP 668); a --user uv is harmless.
  ssh_workers all "set -e; ${prepare:+$prepare && }{ python3 -m pip install --user --quiet --upgrade uv \
|| python3 -m pip install --user --quiet --upgrade --break-system-packages uv; } \
&& python3 -m uv venv --quiet --allow-existing --python $(quote_word "$PYTHON_VERSION") $dir/venv \
&& python3 -m uv pip install --quiet --python $python --reinstall-package posttrain-jax $(quote_word "$target") \
&& $python -c 'import jax, posttrain_jax; print(\"posttrain_jax ready, jax\", jax.__version__)'"
}

# Start `posttrain-jax ARGS...` detached (nohup) on every worker: it survives a dropped ssh
# connection, writes its log on each worker and leaves exit_code behind when it ends.
# Every host runs the same command; JAX's multi-controller runtime finds its peers itself.
start_run() {
  local run_name="$1"
  shift
  local job="" word run_dir
  # The job runs inside REMOTE_DIR so `--config configs/...` resolves as in a local checkout.
  for word in venv/bin/posttrain-jax "$@"; do job+="$(quote_word "$word") "; done
  run_dir="$(quote_word "runs/$run_name")"
  job+="; echo \$? > $run_dir/exit_code"
  log "starting $run_name on every worker of $TPU_NAME"
  ssh_workers all "cd $(quote_word "$REMOTE_DIR") && mkdir -p $run_dir && rm -f $run_dir/exit_code \
&& ln -sfn $(quote_word "$run_name") runs/latest \
&& (PYTHONUNBUFFERED=1 nohup bash -c $(quote_word "$job") >> $run_dir/log.txt 2>&1 < /dev/null &)"
}

# Stream one worker's log of a run until the job writes its exit code; exit with that code.
follow_log() {
  local worker="$1" run_dir
  run_dir="$(quote_word "$REMOTE_DIR/runs/$2")"
  ssh_workers "$worker" "tail -n +1 -F $run_dir/log.txt & tail_pid=\$!; \
until [ -e $run_dir/exit_code ]; do sleep 5; done; sleep 1; kill \$tail_pid; exit \"\$(cat $run_dir/exit_code)\""
}

fetch_log() {
  ssh_workers "$1" "cat $(quote_word "$REMOTE_DIR/runs/$2")/log.txt"
}

# "running", the job's exit code, or "missing" (never started on worker 0). Empty when worker 0
# cannot be reached. Worker 0 stands for the slice: a host that dies stalls the collectives of
# all the others, so their jobs end (or hang) together.
job_status() {
  local run_dir
  run_dir="$(quote_word "$REMOTE_DIR/runs/$1")"
  gcloud_capture 0 compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE[@]}" --worker=0 --strict-host-key-checking=no \
    "${SSH_FLAG_LIST[@]}" "--command=if [ -e $run_dir/exit_code ]; then cat $run_dir/exit_code; \
elif [ -e $run_dir/log.txt ]; then echo running; else echo missing; fi" | tail -n 1 || true
}

# Build TRAINER_ARGS = COMMAND [--config FILE] --config.output_dir=BUCKET/RUN [overrides] [--resume].
# Checked locally, before any gcloud call: the config must be a file under configs/ (the only
# directory shipped to the workers) and output_dir is ours, because resuming after a preemption
# relies on finding the checkpoints at BUCKET/RUN_NAME.
build_trainer_args() {
  local run_name="$1" resume="$2" command="$3"
  shift 3
  [[ "$run_name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "RUN_NAME=$run_name: use letters, digits, '.', '_' and '-'"
  [[ "$command" =~ ^[a-z]+$ ]] || die "expected a posttrain-jax command (sft, rm, dpo, grpo, ...) before the trainer flags, got: $command"
  local config="" rest=()
  while (($#)); do
    case "$1" in
      --config) (($# >= 2)) || die "--config needs a file"; config="$2"; shift 2 ;;
      --config=*) config="${1#--config=}"; shift ;;
      --config.output_dir=*) die "--config.output_dir is set to BUCKET/RUN_NAME by the launcher; pass --bucket or --run-name instead" ;;
      --resume) resume=1; shift ;;
      *) rest+=("$1"); shift ;;
    esac
  done
  TRAINER_ARGS=("$command")
  if [[ -n "$config" ]]; then
    [[ "$config" == configs/* && "$config" != *..* ]] \
      || die "--config $config: give a path under configs/ relative to the repo root (only configs/ is shipped to the workers)"
    [[ -f "$REPO_DIR/$config" ]] || die "--config $config: no such file in $REPO_DIR"
    TRAINER_ARGS+=(--config "$config")
  fi
  TRAINER_ARGS+=("--config.output_dir=$BUCKET/$run_name" "${rest[@]}")
  [[ "$resume" == 1 ]] && TRAINER_ARGS+=(--resume)
  return 0
}
