"""python -m connector.status: the same as the qpid-virtio-status console script."""

import sys

from connector.status.cli import main

sys.exit(main())
