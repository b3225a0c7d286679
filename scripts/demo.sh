#!/usr/bin/env bash
# Set up (if needed) and run the demo: lab up, daemon, a skin applied, its effect measured.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/netskin demo "$@"
