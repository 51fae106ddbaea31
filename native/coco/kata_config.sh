#!/usr/bin/env bash
# Set the TD guest's kernel_params, vCPUs and memory in kata's configuration-qemu-tdx.toml
# (the reference's host step before running pods with runtimeClassName kata-qemu-tdx).
# Changing kernel_params changes RTMR2 of every TD: update the attestation policy after.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: kata_config.sh [--file PATH] [--vcpus N] [--memory MIB] [--kernel-param KEY=VALUE]...
  Edits [hypervisor.qemu] of the kata TDX configuration in place (a .bak copy is kept).
  default file: /opt/confidential-containers/share/defaults/kata-containers/configuration-qemu-tdx.toml
  e.g. sudo kata_config.sh --vcpus 8 --memory 16384 --kernel-param agent.log=debug
USAGE
  exit 2
}

file=/opt/confidential-containers/share/defaults/kata-containers/configuration-qemu-tdx.toml
vcpus=""
memory=""
params=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --file) file=${2:?}; shift 2 ;;
    --vcpus) vcpus=${2:?}; shift 2 ;;
    --memory) memory=${2:?}; shift 2 ;;
    --kernel-param) params+=("${2:?}"); shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
done
[[ -f $file ]] || { echo "no kata configuration at $file (is the CoCo operator installed?)" >&2; exit 1; }
[[ -z $vcpus || $vcpus =~ ^[1-9][0-9]*$ ]] || { echo "--vcpus must be a positive integer" >&2; exit 2; }
[[ -z $memory || $memory =~ ^[1-9][0-9]*$ ]] || { echo "--memory must be MiB, a positive integer" >&2; exit 2; }
[[ -n $vcpus || -n $memory || ${#params[@]} -gt 0 ]] || usage
grep -q '^kernel_params *=' "$file" || { echo "$file has no kernel_params line" >&2; exit 1; }

cp -p "$file" "$file.bak"
[[ -z $vcpus ]] || sed -i -E "s/^default_vcpus *=.*/default_vcpus = $vcpus/" "$file"
[[ -z $memory ]] || sed -i -E "s/^default_memory *=.*/default_memory = $memory/" "$file"
for kv in "${params[@]}"; do
  [[ $kv =~ ^[A-Za-z0-9_.-]+(=[^\"[:space:]]*)?$ ]] || { echo "bad kernel param '$kv'" >&2; exit 2; }
  key=${kv%%=*}
  current=$(sed -n -E 's/^kernel_params *= *"(.*)"/\1/p' "$file" | head -n1)
  kept=""
  for p in $current; do
    [[ ${p%%=*} == "$key" ]] || kept+="$p "
  done
  new="${kept}${kv}"
  sed -i -E "0,/^kernel_params *=.*/s||kernel_params = \"${new//|/\\|}\"|" "$file"
done
grep -E '^(kernel_params|default_vcpus|default_memory) *=' "$file"
