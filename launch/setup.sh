#!/usr/bin/env bash
# Install the same Python venv with posttrain_jax[tpu] on every worker of the TPU VM.
#
# Usage: launch/setup.sh [common flags]
#   INSTALL_FROM=wheel (default): build a wheel of this checkout (or use WHEEL=path), copy it and
#     configs/ to every worker, install it there. Uncommitted changes are included.
#   INSTALL_FROM=git: every worker clones REPO_URL (default: the 'origin' remote) and checks out
#     GIT_REV (default: `git rev-parse HEAD` of this checkout), then installs it. Push first.
#   Needs PROJECT, ZONE and TPU_NAME (or ACCELERATOR_TYPE). Run it again after changing the code.

set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=steps.sh
source "$LAUNCH_DIR/steps.sh"

load_settings_file
while (($#)); do
  if take_common_flag "$@"; then shift "$FLAG_SHIFT"; continue; fi
  case "$1" in
    -h | --help) usage_from_header "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
finalize_settings
require_settings PROJECT ZONE TPU_NAME
setup_workers
