"""Error classes that carry what an operator needs: which key, which path, what cause.

Modelled on ``qemu.qmp``: each error names its subject and wraps its root cause, so the
daemon can print one clear line instead of a traceback. A guest's protocol or limit
violation is ``connector.routing.route.GuestViolation``, which carries its AMQP condition.
"""

from __future__ import annotations


class ConnectorError(Exception):
    """Base class for every error the connector raises on purpose."""


class ConfigError(ConnectorError):
    """A user mistake in the configuration file or on the command line.

    ``where`` names the key (``broker.urls``), the flag (``--channel``) or the path that is
    wrong, so the one line printed for it points straight at the fix.
    """

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message
