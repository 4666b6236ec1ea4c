#!/usr/bin/env bash
# Set up (idempotent) and run the main job on its embedded default: real SmolLM2-135M-Instruct,
# real movie-review sentiment, gate finetuning through TRL, pruning, export, reload, latency.
# Extra arguments go to examples/main_job.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python examples/main_job.py "$@"
