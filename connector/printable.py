"""Host- and guest-chosen text made inert before it reaches a terminal or a log.

Guests choose many strings the connector shows (container-ids, link names, addresses, error
descriptions), and whoever runs a VM chooses its name and ports. Written out as they are,
a newline forges a log line or a table row, and an escape sequence rewrites the operator's
screen. Both the status tool and the daemon's log pass such text through ``printable()``.
"""

from __future__ import annotations

import re

# What a string must not put on an operator's terminal or in a log as it is: the C0
# controls (escape sequences, bell, carriage return and newline, which forge lines), DEL,
# the C1 controls (0x9b is a one-byte CSI for some terminals), the Unicode line and
# paragraph separators (lines to str.splitlines()), and the bidirectional overrides and
# isolates (which reorder the rest of a line for terminals that implement bidi).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with every character in _UNPRINTABLE written as Python writes it in a
    string literal (``\\x1b``, ``\\n``, ``\\u202e``): inert, yet still telling what was
    there. Idempotent, since what it writes is printable, so applying it twice is harmless.
    """
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)
