#!/usr/bin/env bash
# Installs the contract checker `make lint` runs: buf, from the npm package
# @bufbuild/buf (it ships the binary), pinned, under .tools/buf/ (npm itself
# from Debian's package when missing; apt needs root or sudo).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF_VERSION=1.75.0
DIR="$PWD/.tools/buf"
BUF="$DIR/node_modules/.bin/buf"
if [ ! -x "$BUF" ] || [ "$("$BUF" --version 2>/dev/null)" != "$BUF_VERSION" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
  fi
  mkdir -p "$DIR"
  npm install --prefix "$DIR" --silent --no-audit --no-fund "@bufbuild/buf@$BUF_VERSION"
fi
"$BUF" --version >/dev/null
