#!/usr/bin/env bash
# Set up (if needed) and run the demo: lab up, daemon, a skin applied, its effect measured. Needs
# root (run as a user with sudo, it asks for it). Arguments go to `netskin demo`.
set -euo pipefail
source "$(dirname "$0")/as-root.sh" "$@"
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/netskin demo "$@"
