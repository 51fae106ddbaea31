#!/usr/bin/env bash
# Add static host entries (registry, KBS, ingress names) to CoreDNS, so that pods, and under
# CoCo the TD's image pull and attestation agent, resolve the lab's names without a DNS zone.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: coredns_hosts.sh IP NAME [IP NAME]...
  e.g. coredns_hosts.sh 10.0.0.5 registry.hfl-lab.local 10.0.0.5 kbs.hfl-lab.local
  Rewrites the hosts block of the kube-system/coredns Corefile (kubectl must reach the
  cluster) and restarts CoreDNS.
USAGE
  exit 2
}

[[ ${1-} != -h && ${1-} != --help ]] || usage
[[ $# -ge 2 && $(( $# % 2 )) -eq 0 ]] || usage
command -v kubectl >/dev/null || { echo "kubectl is not installed" >&2; exit 1; }
entries=""
while [[ $# -gt 0 ]]; do
  [[ $1 =~ ^[0-9a-fA-F.:]+$ ]] || { echo "'$1' is not an IP address" >&2; exit 2; }
  [[ $2 =~ ^[A-Za-z0-9.-]+$ ]] || { echo "'$2' is not a host name" >&2; exit 2; }
  entries+="           $1 $2"$'\n'
  shift 2
done

corefile=$(kubectl -n kube-system get configmap coredns -o jsonpath='{.data.Corefile}')
# drop a previous lab block, then insert ours before the kubernetes plugin
corefile=$(printf '%s\n' "$corefile" | sed '/# hfl-lab hosts begin/,/# hfl-lab hosts end/d')
block="        # hfl-lab hosts begin"$'\n'"        hosts {"$'\n'"${entries}           fallthrough"$'\n'"        }"$'\n'"        # hfl-lab hosts end"
corefile=$(printf '%s\n' "$corefile" | awk -v block="$block" '/^[[:space:]]*kubernetes / && !done { print block; done=1 } { print }')
kubectl -n kube-system create configmap coredns --from-literal=Corefile="$corefile" \
  --dry-run=client -o yaml | kubectl -n kube-system apply -f -
kubectl -n kube-system rollout restart deployment coredns
kubectl -n kube-system rollout status deployment coredns --timeout=120s
