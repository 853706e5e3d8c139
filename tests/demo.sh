#!/usr/bin/env bash
# The demo: install what it needs (as the tests do), then run tests/demo.py.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
bash tests/install-deps.sh
exec "${PYTHON:-python3}" -m tests.demo "$@"
