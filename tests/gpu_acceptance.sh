#!/usr/bin/env bash
# GPU acceptance, the one command (tests/gpu_acceptance.py says what it runs):
#   bash tests/gpu_acceptance.sh [--prepare | --cpu-smoke | --plan]
# Uses $PYTHON, else the repository's .venv, else the first python3/python that imports torch.
set -euo pipefail
cd "$(dirname "$0")/.."
for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" 2>/dev/null; then
        exec "$candidate" tests/gpu_acceptance.py "$@"
    fi
done
echo "gpu_acceptance: no python with torch found; set PYTHON=/path/to/python" >&2
exit 2
