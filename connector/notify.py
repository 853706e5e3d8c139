"""Tell systemd how the service is doing (``Type=notify``), with the standard library only.

The protocol is one datagram of ``KEY=VALUE`` lines to the unix socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). Outside systemd the
variable is unset and every call is a cheap no-op, so the daemon can call it freely:
``notify(READY=1, STATUS="3 channels")``, ``notify(STOPPING=1)``.
"""

from __future__ import annotations

import os
import socket

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def _address(env: str) -> str | bytes:
    if env.startswith("@"):
        return b"\0" + env[1:].encode()
    return env


def notify(**fields: object) -> bool:
    """Send the fields to systemd; ``False`` when not run by systemd or the send failed.

    A failure is never raised: losing a status line must not take the service down.
    Values must not contain newlines (a ``STATUS`` is one line).
    """
    env = os.environ.get(NOTIFY_SOCKET_ENV)
    if not env or not fields:
        return False
    lines = []
    for key, value in fields.items():
        text = str(value).replace("\n", " ")
        lines.append(f"{key}={text}")
    message = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, _address(env))
    except OSError:
        return False
    return True
