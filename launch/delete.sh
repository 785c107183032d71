#!/usr/bin/env bash
# Delete the TPU VM (or its queued resource, with --force so the node goes too).
#
# Usage: launch/delete.sh [common flags]
#   Needs PROJECT, ZONE and TPU_NAME (or ACCELERATOR_TYPE, which names it posttrain-TYPE).
#   The bucket is left alone: checkpoints and metrics outlive the VM.

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
delete_tpu
