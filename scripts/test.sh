#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit, property and end-to-end tests. Needs root
# (run as a user with sudo, it asks for it). NETSKIN_REQUIRE_E2E=1 turns a skipped end-to-end test
# into a failure (CI sets it). Arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/as-root.sh" "$@"
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
