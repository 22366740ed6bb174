#!/usr/bin/env bash
# Installs Prometheus (Debian/Ubuntu's prometheus package) unless `prometheus` is already on
# PATH, then prints its version. Safe to run again. Used by `make test`: the metrics test
# scrapes a running mesh with a real Prometheus server it starts on a free port.
set -euo pipefail

if ! command -v prometheus >/dev/null 2>&1 && [ ! -x /usr/bin/prometheus ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "prometheus is not installed and there is no apt-get here: install Prometheus 2.x" \
             "(https://prometheus.io/download/) and put it on PATH" >&2
        exit 1
    fi
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "installing prometheus needs root, and sudo is not available" >&2
            exit 1
        fi
        # Ask for a password only at a terminal (tests run this unattended).
        if [ -t 0 ]; then sudo=(sudo); else sudo=(sudo -n); fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists only when they do not know prometheus yet.
    policy="$(apt-cache policy prometheus 2>/dev/null || true)"
    if ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
        echo "updating the package lists ..."
        "${sudo[@]}" apt-get update -qq
    fi
    echo "installing prometheus ..."
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    echo "note: the package may also have started a prometheus system service on :9090;" \
         "aimesh does not use it (the tests start their own on a free port)"
fi

# (not `| head -n 1`: with pipefail, SIGPIPE would fail the script)
version="$(PATH="$PATH:/usr/bin" prometheus --version 2>&1)"
echo "${version%%$'\n'*}"
