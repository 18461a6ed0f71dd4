#!/usr/bin/env bash
# The one check to run the day an accelerator is lent (a few minutes there), or with
# --tiny on a CPU (under a minute; CI runs it so). One "name: value" line per measured
# figure, then "summary: ...". Exit code 1 if the sharded step differs from one device.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/accelerator_check.py "$@"
