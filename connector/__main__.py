"""``python -m connector``: the daemon."""

import sys

from .cli import main

sys.exit(main())
