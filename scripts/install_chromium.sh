#!/usr/bin/env bash
# Install Debian's headless-capable Chromium, which the report screenshot test uses.
#
# Idempotent: does nothing when a chromium binary is already on PATH. Installs with apt-get only when run as
# root; otherwise says what to run and exits non-zero, so that callers (and the test) can skip cleanly.
set -euo pipefail

for candidate in chromium chromium-browser google-chrome; do
    if command -v "$candidate" >/dev/null 2>&1; then
        echo "chromium already installed: $(command -v "$candidate")"
        exit 0
    fi
done

if [ "$(id -u)" -ne 0 ]; then
    echo "chromium is missing and this is not root; install it with: sudo apt-get install -y chromium" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium is missing and apt-get is not available; install chromium with the system's package manager" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "chromium installed: $(command -v chromium)"
