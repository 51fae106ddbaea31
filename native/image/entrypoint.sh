#!/usr/bin/env bash
# Entrypoint of the HFL-TDX Lab image: checks what the manifests promise, then runs the
# participant's command (python -m trainer ps|worker ..., python -m hfl_lab.trust serve ...).
#
# The participant runs as this script's child, with SIGTERM/SIGINT passed on. When it exits 0
# (a worker whose training is over), the script stays idle until the pod is stopped: pods belong
# to StatefulSets, which would restart a finished participant again and again (CrashLoopBackOff).
# Any other exit status is this container's exit status, so Kubernetes restarts a participant
# that failed (ps0 and the workers resume: checkpoints, reconnects).
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: entrypoint.sh COMMAND [ARGS...]
  e.g. entrypoint.sh python -m trainer worker --index 0 --config /etc/hfl-lab/config.yaml
  env: HFL_LAB_ROLE, HFL_LAB_EVIDENCE (simulated|configfs-tsm), HFL_LAB_VAULT_DATA_PATH,
       HFL_LAB_BOOTSTRAP_FILE (the bootstrap Secret volume's file)
USAGE
  exit 2
}

[[ $# -ge 1 ]] || usage

config=""
previous=""
for arg in "$@"; do
  [[ $previous == --config ]] && config=$arg
  previous=$arg
done
if [[ -n $config && ! -r $config ]]; then
  echo "entrypoint: the participant config $config is missing; the hfl-config ConfigMap is not mounted" >&2
  exit 1
fi
if [[ -n ${HFL_LAB_BOOTSTRAP_FILE-} && ! -r $HFL_LAB_BOOTSTRAP_FILE ]]; then
  echo "entrypoint: $HFL_LAB_BOOTSTRAP_FILE is not readable; the run's bootstrap Secret is missing (the lab creates it in start())" >&2
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

stopping=0
child=0
forward() {
  stopping=1
  if [[ $child -ne 0 ]]; then kill -TERM "$child" 2>/dev/null || true; fi
}
trap forward TERM INT

set +e
"$@" &
child=$!
while :; do
  wait "$child"
  status=$?
  # wait returns early (status > 128) when a trapped signal arrives; wait again for the exit
  kill -0 "$child" 2>/dev/null || break
done
set -e

if [[ $status -ne 0 || $stopping -eq 1 ]]; then
  exit "$status"
fi
# the idle trap first: a stop that arrives while the line below is written must still exit
trap 'exit 0' TERM INT
echo "entrypoint: ${HFL_LAB_ROLE:-the participant} finished; idle until the pod is stopped" >&2
while :; do
  sleep 3600 &
  wait $! || true
done
