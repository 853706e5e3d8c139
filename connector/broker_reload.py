"""Which BrokerPool new upstream connections use, and how SIGHUP replaces it.

An operator rotates the broker's password, renews a TLS certificate or moves to another
broker and runs ``systemctl reload``; like an nginx or haproxy reload, that must reach the
next connections without dropping the guests connected now. So a reload builds a new pool
beside the running one and, only once it has been built without error, makes it the pool
that every channel reads when it opens its next upstream. An upstream already open (or
still connecting) keeps the pool and engine it was made with until it ends.

The comparison is by the settings as read (a password file's content, not its path) and by
the content of the TLS files, since a renewed certificate usually keeps its file name.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from .errors import ConfigError
from .upstream import BrokerPool, TLSSettings, UpstreamSettings

# The [broker.tls] keys that name a file whose content a reload compares.
TLS_FILE_KEYS = ("ca_file", "cert_file", "key_file")


def tls_file_digests(tls: TLSSettings) -> dict[str, bytes]:
    """A digest of each TLS file set, by its key: what a renewal in place changes.

    Raises ConfigError naming the key whose file cannot be read.
    """
    digests = {}
    for key in TLS_FILE_KEYS:
        path = getattr(tls, key)
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                digests[key] = hashlib.file_digest(f, "sha256").digest()
        except OSError as err:
            raise ConfigError(f"broker.tls.{key}", f"{path}: {err.strerror or err}") from err
    return digests


def changed_keys(old: UpstreamSettings, new: UpstreamSettings) -> list[str]:
    """The ``[broker]`` keys whose settings differ, named as in the file, for the log.

    Every field is compared, so a setting added to UpstreamSettings later is never
    missed; a password shows here by its key only.
    """
    names = []
    for f in dataclasses.fields(UpstreamSettings):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if f.name == "tls":
            names += [
                f"tls.{g.name}"
                for g in dataclasses.fields(TLSSettings)
                if getattr(before, g.name) != getattr(after, g.name)
            ]
        elif before != after:
            names.append(f.name)
    return names


@dataclass(frozen=True)
class PoolChange:
    """A new pool, built and checked, that a reload has not put in place yet."""

    pool: BrokerPool
    changed: tuple[str, ...]  # the [broker] keys that differ, for the log
    digests: dict[str, bytes]


class CurrentBrokers:
    """The pool for the next upstream connection; calling it returns that pool.

    Channels are given this, not a pool, and call it when they open an upstream (never
    per message), so a reload reaches channels that were started before it.
    """

    def __init__(self, settings: UpstreamSettings) -> None:
        """Raises ConfigError when a TLS file cannot be used (BrokerPool) or read."""
        self.pool = BrokerPool(settings)
        self._digests = tls_file_digests(settings.tls)

    def __call__(self) -> BrokerPool:
        return self.pool

    def prepare(self, fresh: UpstreamSettings) -> PoolChange | None:
        """The pool a reload to ``fresh`` would use, or None when nothing in ``[broker]``
        changed (the running pool, and its failover position, stay).

        Nothing is replaced yet: the daemon applies the change only once the whole new
        configuration has been read without error. Raises ConfigError (from BrokerPool:
        a TLS file that is not PEM, a key that does not match) naming the key.
        """
        digests = tls_file_digests(fresh.tls)
        changed = changed_keys(self.pool.settings, fresh)
        changed += [
            f"tls.{key} (contents)"
            for key in TLS_FILE_KEYS
            if f"tls.{key}" not in changed and digests.get(key) != self._digests.get(key)
        ]
        if not changed:
            return None
        return PoolChange(BrokerPool(fresh), tuple(changed), digests)

    def apply(self, change: PoolChange) -> None:
        """Make ``change`` the pool of every upstream connection opened from now on."""
        change.pool.take_position(self.pool)
        self.pool = change.pool
        self._digests = change.digests
