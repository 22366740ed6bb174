#!/usr/bin/env bash
# Installs Chromium (Debian's `chromium` package) unless a Chromium or Chrome binary is
# already on PATH, then prints its version. Safe to run again. Used by the dashboard test
# (tests/test_dashboard.py), which drives the control plane's web page in headless Chromium.
set -euo pipefail

find_chromium() {
    local name
    for name in chromium chromium-browser google-chrome-stable google-chrome; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

if ! find_chromium >/dev/null; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "chromium is not installed and there is no apt-get here: install Chromium or" \
             "Chrome and put it on PATH" >&2
        exit 1
    fi
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "installing chromium needs root, and sudo is not available" >&2
            exit 1
        fi
        # Ask for a password only at a terminal (tests run this unattended).
        if [ -t 0 ]; then sudo=(sudo); else sudo=(sudo -n); fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists only when they do not know chromium yet.
    policy="$(apt-cache policy chromium 2>/dev/null || true)"
    if ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
        echo "updating the package lists ..."
        "${sudo[@]}" apt-get update -qq
    fi
    echo "installing chromium ..."
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

# (stderr dropped: Debian's wrapper script complains about its own memory check)
"$(find_chromium)" --version 2>/dev/null
