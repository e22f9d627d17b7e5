#!/usr/bin/env bash
# Install Debian's chromium for the report screenshot test (tests/test_report.py).
# Usage: ci/chromium.sh            (root, or sudo available; idempotent; Debian/Ubuntu apt)
# The test looks for `chromium` (or $CHROMIUM) and is skipped without it, unless
# SNAKETUNE_REQUIRE_CHROMIUM=1 (CI sets it after running this script), where it fails instead.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    chromium --version
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
# fonts: without any the page renders as empty boxes
$SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
chromium --version
