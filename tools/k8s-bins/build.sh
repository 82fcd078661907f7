#!/usr/bin/env bash
# Builds the local control plane (kube-apiserver, kube-controller-manager, etcd, helm) from the pinned Go modules
# beside this script, once, into a cache outside the clone keyed by the modules' go.mod/go.sum and this script.
# Prints the bin directory on stdout (last line). Re-running with a warm cache costs a hash and a few stat calls.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

K8S_VERSION=v1.37.2
HELM_VERSION=v3.22.0

die() { echo "portcullis k8s-bins: $*" >&2; exit 1; }
command -v go >/dev/null 2>&1 || die "Go toolchain not found on PATH; install Go >= 1.26 (https://go.dev/dl) and re-run."
command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found; install coreutils."

key=$(cat "$here/build.sh" "$here"/*/go.mod "$here"/*/go.sum | sha256sum | cut -c1-16)
cache_root=${PORTCULLIS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/portcullis}
bin="$cache_root/bin/$key"
want=(kube-apiserver kube-controller-manager etcd helm)

have_all() { for b in "${want[@]}"; do [ -x "$bin/$b" ] || return 1; done; }
if have_all; then echo "$bin"; exit 0; fi

mkdir -p "$cache_root/bin"
# One build at a time per cache (CI and a developer's shell may race).
exec 9>"$cache_root/bin/.lock"
flock 9
if have_all; then echo "$bin"; exit 0; fi

tmp="$bin.tmp.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
export CGO_ENABLED=0 GOFLAGS=-mod=mod
stage() { echo "portcullis k8s-bins: $1" >&2; }

ld="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=37 -X $p.gitTreeState=clean"
done
t0=$(date +%s)
stage "building kube-apiserver + kube-controller-manager $K8S_VERSION (cold: ~10-25 min on 2 cores)"
(cd "$here/apiserver" && go build -trimpath -pgo=off -tags=selinux,notest -ldflags="$ld" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager) \
  || die "building kube-apiserver failed (see above). A 'module lookup disabled' or 'dial tcp' error means the Go module proxy was unreachable: check GOPROXY and the network, then re-run."
t1=$(date +%s); stage "kube-apiserver + kube-controller-manager built in $((t1 - t0))s"

stage "building etcd"
(cd "$here/etcd" && go build -trimpath -ldflags="-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3) \
  || die "building etcd failed (see above); check GOPROXY and the network, then re-run."
t2=$(date +%s); stage "etcd built in $((t2 - t1))s"

stage "building helm $HELM_VERSION"
(cd "$here/helm" && go build -trimpath \
    -ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    -o "$tmp/helm" helm.sh/helm/v3/cmd/helm) \
  || die "building helm failed (see above); check GOPROXY and the network, then re-run."
t3=$(date +%s); stage "helm built in $((t3 - t2))s"

rm -rf "$bin"; mv "$tmp" "$bin"; trap - EXIT
stage "control-plane binaries cached in $bin (total $((t3 - t0))s)"
echo "$bin"
