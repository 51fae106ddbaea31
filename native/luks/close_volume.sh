#!/usr/bin/env bash
# Unmount a model volume opened with open_volume.sh and remove its dm-crypt mapping.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: close_volume.sh MOUNTPOINT MAPPING
  MAPPING is the name open_volume.sh printed (see also: dmsetup ls --target crypt).
USAGE
  exit 2
}

[[ $# -eq 2 ]] || usage
mountpoint=$1
mapping=$2
sync
if mountpoint -q "$mountpoint"; then
  umount "$mountpoint"
fi
cryptsetup close "$mapping"
echo "closed $mapping"
