"""``python -m tests.support.watched_daemon ARGS``: the daemon (``python -m connector ARGS``)
with its routing core under the use-after-free watch (tests/support/freed.py).

A call the watch catches raises where it happens, so the daemon ends that guest's connection
with ``amqp:internal-error`` and logs it, like any bug met while serving one guest; the watch
also makes the daemon exit ``EXIT_FREED`` however it would have exited, so a test that checks
for a clean exit (tests/support/connector.serving) fails even when the guest's connection
recovered.
"""

from __future__ import annotations

import sys

from connector.cli import main
from tests.support import freed

# EX_SOFTWARE (sysexits.h): an internal software error.
EXIT_FREED = 70

if __name__ == "__main__":
    watch = freed.install(setattr)
    status = main()
    if watch.violations:
        for why in watch.violations:
            print(f"use after free: {why}", file=sys.stderr)
        status = EXIT_FREED
    sys.exit(status)
