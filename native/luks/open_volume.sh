#!/usr/bin/env bash
# Open a LUKS model volume with dm-crypt and mount it, on a privileged host (root, dm-crypt);
# the reference's mount_encrypted_vfs.sh. Close it again with close_volume.sh.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: open_volume.sh VOLUME_FILE MOUNTPOINT [--read-only]
  Reads the passphrase from stdin (never from argv or a file), e.g.
    kbs-client get-resource ... | sudo ./open_volume.sh model.luks /mnt/model
  Prints the dm-crypt mapping name, which close_volume.sh needs.
USAGE
  exit 2
}

[[ $# -ge 2 && $# -le 3 ]] || usage
volume=$1
mountpoint=$2
ro_crypt=()
ro_mount=""
if [[ ${3-} == --read-only ]]; then
  ro_crypt=(--readonly)
  ro_mount=",ro"
elif [[ -n ${3-} ]]; then
  usage
fi
[[ -f $volume ]] || { echo "no volume file at $volume" >&2; exit 1; }
[[ ! -t 0 ]] || { echo "pipe the passphrase on stdin" >&2; exit 2; }

mapping="hfl-vault-$(basename "$volume" | tr -c 'A-Za-z0-9\n' '-')"
mkdir -p "$mountpoint"
cryptsetup open --type luks "${ro_crypt[@]}" --key-file - "$volume" "$mapping"
if ! mount -o "nosuid,nodev,noexec$ro_mount" "/dev/mapper/$mapping" "$mountpoint"; then
  cryptsetup close "$mapping"
  exit 1
fi
echo "$mapping"
