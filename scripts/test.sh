#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit, property and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
