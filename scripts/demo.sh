#!/usr/bin/env bash
# Set up celery-breaker and run the quick-start demo on the embedded defaults
# (in-memory broker, in-memory breaker store, a worker thread: no server needed).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e .
exec "$VENV/bin/python" examples/quickstart.py
