#!/usr/bin/env bash
# Entrypoint of the HFL-TDX Lab image: checks the mounts the manifests promise, then execs
# the participant's command (python -m trainer ps|worker ..., python -m hfl_lab.trust serve ...).
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: entrypoint.sh COMMAND [ARGS...]
  e.g. entrypoint.sh python -m trainer worker --index 0 --config /etc/hfl-lab/config.yaml
  env: HFL_LAB_ROLE, HFL_LAB_EVIDENCE (simulated|configfs-tsm), HFL_LAB_VAULT_DATA_PATH
USAGE
  exit 2
}

[[ $# -ge 1 ]] || usage
if [[ -n ${HFL_LAB_ROLE-} && ! -r /etc/hfl-lab/config.yaml ]]; then
  echo "entrypoint: /etc/hfl-lab/config.yaml is missing; the hfl-config ConfigMap is not mounted" >&2
  exit 1
fi
if [[ ${HFL_LAB_EVIDENCE-} == configfs-tsm && ! -d /sys/kernel/config/tsm/report ]]; then
  echo "entrypoint: HFL_LAB_EVIDENCE=configfs-tsm but /sys/kernel/config/tsm/report is absent (not a TD?)" >&2
  exit 1
fi
if [[ ${HFL_LAB_VAULT_DATA_PATH-} == kernel && $(id -u) -ne 0 ]]; then
  echo "entrypoint: the kernel vault path needs root (dm-crypt); run the ps container privileged" >&2
  exit 1
fi
mkdir -p /run/hfl-lab 2>/dev/null || true
exec "$@"
