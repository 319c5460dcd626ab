# Sourced by the benchmark shell scripts: strict mode, the repository root as the working directory
# (ROOT, on PYTHONPATH, so no install is needed) and PY, the interpreter: $PYTHON, else .venv/bin/python,
# else python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
