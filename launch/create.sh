#!/usr/bin/env bash
# Create the TPU VM (or a queued resource for it, then wait until it is ACTIVE).
#
# Usage: launch/create.sh [common flags]
#   Needs PROJECT, ZONE, ACCELERATOR_TYPE. Common flags (see launch/README.md): --dry-run
#   --project --zone --accelerator-type --runtime-version --tpu-name --bucket
#   --provisioning on-demand|spot|reserved|preemptible --queued|--no-queued --install-from wheel|git

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
require_settings PROJECT ZONE ACCELERATOR_TYPE
create_tpu
