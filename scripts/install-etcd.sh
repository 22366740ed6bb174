#!/usr/bin/env bash
# Installs etcd (Debian/Ubuntu's etcd-server package) unless `etcd` is already on PATH, then
# prints its version. Safe to run again. Used by `make etcd` and the etcd store's tests.
set -euo pipefail

if ! command -v etcd >/dev/null 2>&1 && [ ! -x /usr/bin/etcd ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "etcd is not installed and there is no apt-get here: install etcd 3.4 or later" \
             "(https://etcd.io/docs/latest/install/) and put it on PATH" >&2
        exit 1
    fi
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "installing etcd-server needs root, and sudo is not available" >&2
            exit 1
        fi
        # Ask for a password only at a terminal (tests run this unattended).
        if [ -t 0 ]; then sudo=(sudo); else sudo=(sudo -n); fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists only when they do not know etcd-server yet.
    policy="$(apt-cache policy etcd-server 2>/dev/null || true)"
    if ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
        echo "updating the package lists ..."
        "${sudo[@]}" apt-get update -qq
    fi
    echo "installing etcd-server ..."
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
    echo "note: the package may also have started an etcd system service on 127.0.0.1:2379;" \
         "\`make etcd\` needs that port (\`systemctl disable --now etcd\` frees it)"
fi

# (not `| head -n 1`: with pipefail, etcd's SIGPIPE would fail the script)
version="$(PATH="$PATH:/usr/bin" etcd --version)"
echo "${version%%$'\n'*}"
