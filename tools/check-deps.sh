#!/usr/bin/env bash
# Holds the crate boundaries of docs/architecture.md with `cargo tree` (no build; a few seconds):
#   table: no kube, tokio or hyper; store: no kube, hyper, controller or proxy; proxy: kube's client only (no
#   kube-runtime, kube-derive, schemars); the plugin: kube's client only, the proxy's decision code, no controller; only the controller's own targets and bench/ link the controller library;
#   xtask links none of resvg, it, kube, tokio (it only delegates: compiled apart from the workspace build, its
#   dependencies would compile twice);
#   one jiff in the tree.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
fail=0
deps() { cargo tree --locked -e normal --prefix none --format '{p}' -p "$1" | awk '{print $1}' | sort -u; }
forbid() { # crate, forbidden dependency names...
  local crate=$1; shift
  local have; have=$(deps "$crate")
  for bad in "$@"; do
    if grep -qx "$bad" <<<"$have"; then
      echo "check-deps: $crate depends on $bad (see docs/architecture.md); \`cargo tree -p $crate -i $bad\` shows the path" >&2
      fail=1
    fi
  done
}
forbid portcullis-table kube kube-client tokio hyper k8s-openapi
forbid portcullis-store kube kube-client k8s-openapi hyper portcullis-controller portcullis-proxy
forbid portcullis-proxy kube-runtime kube-derive schemars portcullis-controller
forbid portcullis-testkit portcullis-controller kube-runtime
forbid kubectl-portcullis kube-runtime kube-derive schemars portcullis-controller
forbid xtask portcullis-controller resvg portcullis-bench portcullis-testkit kube tokio
users=$(cargo tree --locked -e normal --prefix none --format '{p}' -i portcullis-controller | awk '{print $1}' | sort -u | grep -vx portcullis-controller || true)
if [ -n "$users" ] && [ "$users" != "portcullis-bench" ]; then
  echo "check-deps: only portcullis-bench may link the controller library; also: $(echo "$users" | grep -vx portcullis-bench | tr '\n' ' ')" >&2
  fail=1
fi
if cargo tree --locked -e normal,build -d --depth 0 --prefix none --format '{p}' | awk '{print $1}' | grep -qx jiff; then
  echo "check-deps: two jiff versions in the tree (\`cargo tree -d -i jiff\`)" >&2
  fail=1
fi
[ $fail = 0 ] && echo "check-deps: crate boundaries hold"
exit $fail
