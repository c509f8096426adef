#!/usr/bin/env bash
# Set up the environment (idempotent) and run the default test suite.
#   bash tests/run.sh            # default suite (slow tests excluded)
#   bash tests/run.sh -m slow    # any extra pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
exec python -m pytest "$@"
