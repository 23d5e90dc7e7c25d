#!/usr/bin/env bash
# The README's test command: set up, then run the whole suite (fails on any failure or on no tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
