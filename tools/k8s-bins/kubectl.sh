#!/usr/bin/env bash
# Builds kubectl from the same pinned k8s.io/kubernetes modules as the local control plane (tools/k8s-bins/apiserver),
# once, into its own cache entry (so adding it did not invalidate the control plane's cache). Prints the directory
# holding `kubectl` on stdout (last line). Used by `cargo xtask up`.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
K8S_VERSION=v1.37.2

die() { echo "portcullis kubectl: $*" >&2; exit 1; }
command -v go >/dev/null 2>&1 || die "Go toolchain not found on PATH; install Go >= 1.26 and re-run."

key=$(cat "$here/kubectl.sh" "$here/apiserver/go.mod" "$here/apiserver/go.sum" | sha256sum | cut -c1-16)
cache_root=${PORTCULLIS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/portcullis}
bin="$cache_root/kubectl/$key"
if [ -x "$bin/kubectl" ]; then echo "$bin"; exit 0; fi

mkdir -p "$cache_root/kubectl"
exec 9>"$cache_root/kubectl/.lock"
flock 9
if [ -x "$bin/kubectl" ]; then echo "$bin"; exit 0; fi
tmp="$bin.tmp.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
export CGO_ENABLED=0 GOFLAGS=-mod=mod
ld="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=37 -X $p.gitTreeState=clean"
done
t0=$(date +%s)
echo "portcullis kubectl: building kubectl $K8S_VERSION from tools/k8s-bins/apiserver's modules" >&2
# In a copy of the module: resolving kubectl's extra packages adds go.sum lines, and the control plane's cache key
# hashes apiserver/go.sum (building in place would invalidate it).
cp -r "$here/apiserver" "$tmp/src"
(cd "$tmp/src" && go build -trimpath -tags=notest -ldflags="$ld" -o "$tmp/kubectl" k8s.io/kubernetes/cmd/kubectl && rm -rf "$tmp/src") \
  || die "building kubectl failed (see above); a 'dial tcp' or 'module lookup disabled' error means the Go module proxy was unreachable."
rm -rf "$bin"; mv "$tmp" "$bin"; trap - EXIT
echo "portcullis kubectl: built in $(( $(date +%s) - t0 ))s, cached in $bin" >&2
echo "$bin"
