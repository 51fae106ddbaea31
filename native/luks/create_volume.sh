#!/usr/bin/env bash
# Create a LUKS model volume file with an ext4 file system inside, on a privileged host
# (root, dm-crypt). Same layout as hfl_lab.vault.ModelVault.create; the reference's
# create_encrypted_vfs.sh does this step by hand.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: create_volume.sh VOLUME_FILE SIZE_MB [--luks2]
  Reads the passphrase from stdin (never from argv or a file), e.g.
    kbs-client get-resource ... | sudo ./create_volume.sh model.luks 256
  LUKS1 by default so that the user-space path of hfl_lab can open the volume too;
  --luks2 uses LUKS2 with pbkdf2 and 512-byte sectors for the same reason.
USAGE
  exit 2
}

[[ $# -ge 2 && $# -le 3 ]] || usage
volume=$1
size_mb=$2
luks_args=(--type luks1)
if [[ ${3-} == --luks2 ]]; then
  luks_args=(--type luks2 --pbkdf pbkdf2 --sector-size 512)
elif [[ -n ${3-} ]]; then
  usage
fi
[[ $size_mb =~ ^[0-9]+$ && $size_mb -ge 8 ]] || { echo "SIZE_MB must be an integer >= 8" >&2; exit 2; }
[[ ! -e $volume ]] || { echo "$volume exists; refusing to overwrite a vault" >&2; exit 1; }
[[ ! -t 0 ]] || { echo "pipe the passphrase on stdin" >&2; exit 2; }

# Hold the passphrase in a shell variable only as long as needed; it reaches cryptsetup on stdin.
passphrase=$(cat)
[[ ${#passphrase} -ge 32 ]] || { echo "the passphrase must have at least 32 bytes" >&2; exit 2; }

mapping="hfl-vault-$$"
mountpoint=$(mktemp -d /run/hfl-vault.XXXXXX)
cleanup() {
  mountpoint -q "$mountpoint" && umount "$mountpoint"
  [[ -e /dev/mapper/$mapping ]] && cryptsetup close "$mapping"
  rmdir "$mountpoint" 2>/dev/null || true
}
trap cleanup EXIT

(umask 077 && truncate -s "${size_mb}M" "$volume")
printf '%s' "$passphrase" | cryptsetup luksFormat --batch-mode "${luks_args[@]}" \
  --cipher aes-xts-plain64 --key-size 512 --hash sha256 --key-file - "$volume"
printf '%s' "$passphrase" | cryptsetup open --type luks --key-file - "$volume" "$mapping"
unset passphrase
mkfs.ext4 -q -L hfl-model -m 0 "/dev/mapper/$mapping"
mount -o nosuid,nodev,noexec "/dev/mapper/$mapping" "$mountpoint"
mkdir -p "$mountpoint/checkpoints" "$mountpoint/provenance" "$mountpoint/files"
echo "created $volume ($(cryptsetup luksDump "$volume" | awk '/^Version/ {print "LUKS" $2}'))"
