#!/usr/bin/env bash
# Create .venv in the repo (once) and install ntrl into it, with torch from the CPU wheel.
#   bash scripts/setup.sh          the package and its runtime dependencies
#   bash scripts/setup.sh --dev    also the test tools (pytest, hypothesis, pytest-xdist)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# torch first and pinned, so that nothing else can pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU wheel)" >&2
  "${PIP[@]}" "torch==2.13.0"
fi
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
echo "setup: installing ntrl${extra}" >&2
"${PIP[@]}" -e ".${extra}" "torch==2.13.0"
.venv/bin/python -c "import ntrl.envs, ntrl.agents, torch; print('setup: ok, torch', torch.__version__)" >&2
