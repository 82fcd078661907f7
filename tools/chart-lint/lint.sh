#!/usr/bin/env bash
# Lints the Helm chart as the ecosystem does: `helm lint --strict`, then kube-score and checkov on `helm template`
# of the default values and of a values set turning the optional parts on (cert-manager, PodMonitor, ...). Every
# finding must be fixed or excepted in the chart with its reason (checkov.io/skipN, kube-score/ignore annotations).
# The linters are built once into a cache outside the clone (like tools/k8s-bins/build.sh), keyed by their versions:
#   kube-score: the Go module pinned in kube-score/go.mod (`go tool` dependency), built with `go build`;
#   checkov:    the PyPI version below, in a venv.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

CHECKOV_VERSION=3.3.30
KUBE_SCORE_VERSION=v1.20.0   # must match kube-score/go.mod

die() { echo "portcullis chart-lint: $*" >&2; exit 1; }
say() { echo "portcullis chart-lint: $*" >&2; }
command -v go >/dev/null 2>&1 || die "Go toolchain not found on PATH (needed to build kube-score)"
command -v python3 >/dev/null 2>&1 || die "python3 not found (needed for checkov)"
grep -q "github.com/zegl/kube-score $KUBE_SCORE_VERSION" "$here/kube-score/go.mod" \
  || die "KUBE_SCORE_VERSION ($KUBE_SCORE_VERSION) differs from kube-score/go.mod"

cache_root=${PORTCULLIS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/portcullis}
# Keyed by what is installed (not by this script, so editing the checks below reinstalls nothing).
key=$( (echo "checkov $CHECKOV_VERSION"; cat "$here/kube-score/go.mod" "$here/kube-score/go.sum") | sha256sum | cut -c1-16)
tools="$cache_root/chart-lint/$key"
mkdir -p "$cache_root/chart-lint"
exec 9>"$cache_root/chart-lint/.lock"
flock 9
if [ ! -x "$tools/bin/kube-score" ]; then
  t0=$(date +%s)
  say "building kube-score $KUBE_SCORE_VERSION (once; ~80s on 2 cores)"
  mkdir -p "$tools/bin"
  (cd "$here/kube-score" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath \
      -ldflags="-s -w -X main.version=$KUBE_SCORE_VERSION" -o "$tools/bin/kube-score.tmp" \
      github.com/zegl/kube-score/cmd/kube-score) \
    || die "building kube-score failed (see above); check GOPROXY and the network"
  mv "$tools/bin/kube-score.tmp" "$tools/bin/kube-score"
  say "kube-score built in $(( $(date +%s) - t0 ))s"
fi
if [ ! -e "$tools/checkov/.installed" ]; then
  t0=$(date +%s)
  say "installing checkov $CHECKOV_VERSION from PyPI into $tools/checkov (once; ~2 min)"
  rm -rf "$tools/checkov"   # a venv is not relocatable: built in place, marked complete at the end
  python3 -m venv "$tools/checkov" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$tools/checkov/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION" \
    || die "pip install checkov==$CHECKOV_VERSION failed"
  touch "$tools/checkov/.installed"
  say "checkov installed in $(( $(date +%s) - t0 ))s"
fi
flock -u 9

helm="$(bash "$root/tools/k8s-bins/build.sh" | tail -1)/helm"
chart="$root/charts/portcullis"
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
export HELM_CONFIG_HOME="$out/helm" HELM_CACHE_HOME="$out/helm" HELM_DATA_HOME="$out/helm"

"$helm" lint --strict --kube-version 1.37.2 "$chart" >&2 || die "helm lint --strict failed"
"$helm" template portcullis "$chart" -n portcullis-system --kube-version 1.37.2 > "$out/default.yaml"
"$helm" template portcullis "$chart" -n portcullis-system --kube-version 1.37.2 \
  --set webhook.certManager.enabled=true --set podMonitor.enabled=true --set serviceMonitor.enabled=true \
  --set dashboards.enabled=true --set prometheusRule.enabled=true \
  --set store.url=redis://redis.store:6379/0 --set store.existingSecret=redis-auth > "$out/optional.yaml"

status=0
for values in default optional; do
  # kube-score: every check, warnings fail too. (PodMonitor, ServiceMonitor and cert-manager kinds are not scored.)
  if "$tools/bin/kube-score" score --exit-one-on-warning --output-format ci "$out/$values.yaml" > "$out/ks.txt"; then
    say "kube-score ($values values): clean ($(grep -c '^\[OK\]' "$out/ks.txt") checks OK)"
  else
    grep -E '^\[(CRITICAL|WARNING)\]' "$out/ks.txt" >&2 || cat "$out/ks.txt" >&2
    say "kube-score ($values values): FAILED"; status=1
  fi
  # checkov: no network (`--skip-download`: no guideline fetch from Prisma Cloud).
  if (cd "$out" && BC_SKIP_MAPPING=TRUE CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false "$tools/checkov/bin/checkov" \
        -f "$values.yaml" --framework kubernetes --compact --quiet --skip-download > "$out/ck.txt" 2>&1); then
    say "checkov ($values values): $(grep -m1 -o 'Passed checks: [0-9]*, Failed checks: [0-9]*, Skipped checks: [0-9]*' "$out/ck.txt")"
  else
    cat "$out/ck.txt" >&2
    say "checkov ($values values): FAILED"; status=1
  fi
done
exit $status
