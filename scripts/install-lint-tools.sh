#!/usr/bin/env bash
# Installs the contract checker `make lint` runs: buf, from the npm package
# @bufbuild/buf (it ships the binary), pinned, under .tools/buf/.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF_VERSION=1.75.0
DIR="$PWD/.tools/buf"
BUF="$DIR/node_modules/.bin/buf"
if [ ! -x "$BUF" ] || [ "$("$BUF" --version 2>/dev/null)" != "$BUF_VERSION" ]; then
  command -v npm >/dev/null 2>&1 || {
    echo "npm is needed to install buf (apt-get install npm)" >&2
    exit 1
  }
  mkdir -p "$DIR"
  npm install --prefix "$DIR" --silent --no-audit --no-fund "@bufbuild/buf@$BUF_VERSION"
fi
"$BUF" --version >/dev/null
