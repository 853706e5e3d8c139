#!/usr/bin/env bash
# Install the suite's dependencies, then run pytest from the repository root.
# Extra arguments go to pytest (e.g. `tests/run.sh tests/integration -k artemis`, `-m vm`).
# Exits non-zero on any failure, and also when no test was collected (pytest's exit 5), so a
# broken collection can never pass as a green run.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
bash tests/install-deps.sh || exit $?

# -ra: say why anything was skipped or failed; -p no:cacheprovider: no .pytest_cache in the tree.
"${PYTHON:-python3}" -m pytest -ra -p no:cacheprovider "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "run.sh: pytest collected no tests; treating that as a failure" >&2
    exit 1
fi
exit "$status"
