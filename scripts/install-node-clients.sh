#!/usr/bin/env bash
# Installs the Node.js test clients' packages (tests/node: @grpc/grpc-js, @grpc/grpc-js-xds,
# @grpc/proto-loader, as pinned in its package-lock.json) with `npm ci`, when node_modules is
# missing or older than the lock file; installs Node.js and npm themselves (Debian's nodejs
# and npm packages) if they are not on PATH. Says nothing when all is in place. Safe to run
# again. Used by `make test`: tests/test_node_client.py runs tests/node/client.js.
set -euo pipefail

dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/node"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "node and npm are not installed and there is no apt-get here: install Node.js 20" \
             "or later with npm (https://nodejs.org/en/download) and put them on PATH" >&2
        exit 1
    fi
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "installing nodejs and npm needs root, and sudo is not available" >&2
            exit 1
        fi
        # Ask for a password only at a terminal (tests run this unattended).
        if [ -t 0 ]; then sudo=(sudo); else sudo=(sudo -n); fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists only when they do not know npm yet.
    policy="$(apt-cache policy npm 2>/dev/null || true)"
    if ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
        echo "updating the package lists ..."
        "${sudo[@]}" apt-get update -qq
    fi
    # (nodejs may already be there without npm: a NodeSource nodejs bundles its own npm, and
    # Debian's npm conflicts with it; then only a missing npm is an error.)
    if ! command -v node >/dev/null 2>&1; then
        echo "installing nodejs and npm ..."
        "${sudo[@]}" apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
    elif ! command -v npm >/dev/null 2>&1; then
        echo "installing npm ..."
        "${sudo[@]}" apt-get install -y -qq --no-install-recommends npm >/dev/null
    fi
fi

# npm writes node_modules/.package-lock.json at each install: it is the stamp.
stamp="$dir/node_modules/.package-lock.json"
if [ -f "$stamp" ] && [ ! "$dir/package-lock.json" -nt "$stamp" ] \
        && [ ! "$dir/package.json" -nt "$stamp" ]; then
    exit 0
fi

echo "installing the Node.js test clients' packages in tests/node (npm ci) ..."
# --ignore-scripts: the only install script among them is protobufjs's postinstall, a
# version-scheme check that does nothing here (and npm 11 warns about unapproved scripts).
if ! log="$(cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error 2>&1)"; then
    echo "$log" >&2
    echo "npm ci failed in $dir (is the npm registry reachable? see above)" >&2
    exit 1
fi
if [ -n "$log" ]; then sed '/^$/d' <<<"$log"; fi
touch "$stamp"
echo "node $(node --version): $(cd "$dir" && node -p \
    "['@grpc/grpc-js', '@grpc/grpc-js-xds', '@grpc/proto-loader']
        .map(n => n + '@' + require(n + '/package.json').version).join(' ')")"
