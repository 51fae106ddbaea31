#!/usr/bin/env bash
# Start the self-hosted registry the lab pushes its (encrypted, signed) image to.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: registry.sh [--port PORT] [--data DIR] [--cert CERT --key KEY]
  Runs registry:2 in Docker as "hfl-lab-registry" (restarted if it exists). With a
  certificate it serves HTTPS; without, HTTP (set registry_insecure in LabConfig, and list
  the registry as insecure in containerd and, for CoCo, in the guest's image-rs config).
USAGE
  exit 2
}

port=5000
data=/var/lib/hfl-lab-registry
cert=""
key=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --port) port=${2:?}; shift 2 ;;
    --data) data=${2:?}; shift 2 ;;
    --cert) cert=${2:?}; shift 2 ;;
    --key) key=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
done
[[ $port =~ ^[0-9]+$ ]] || usage
[[ -z $cert && -z $key || -f $cert && -f $key ]] || { echo "--cert and --key must both be files" >&2; exit 2; }
command -v docker >/dev/null || { echo "docker is not installed" >&2; exit 1; }

mkdir -p "$data"
docker rm -f hfl-lab-registry >/dev/null 2>&1 || true
args=(-d --restart=always --name hfl-lab-registry -p "$port:5000" -v "$data:/var/lib/registry")
if [[ -n $cert ]]; then
  certdir=$(cd "$(dirname "$cert")" && pwd)
  args+=(-v "$certdir:/certs:ro"
         -e "REGISTRY_HTTP_TLS_CERTIFICATE=/certs/$(basename "$cert")"
         -e "REGISTRY_HTTP_TLS_KEY=/certs/$(basename "$key")")
fi
docker run "${args[@]}" registry:2
echo "registry on port $port"
