#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Slow tests on the real model run too unless
# PEFT_GATES_FAST=1; pass extra pytest arguments after the script name.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check peft_gates tests benchmarks examples integrations
marker=()
if [ "${PEFT_GATES_FAST:-0}" = "1" ]; then marker=(-m "not slow"); fi
python -m pytest -q -p no:cacheprovider "${marker[@]}" "$@"
