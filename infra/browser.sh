#!/usr/bin/env bash
# Headless Chromium for the dashboard's browser tests and benchmark: Debian's chromium and chromium-driver,
# installed with apt-get when missing (as root or with sudo). Idempotent: does nothing when both are there.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "infra/browser.sh: need root or sudo to apt-get install chromium" >&2; exit 1; }
    SUDO="sudo"
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver
