"""Per-guest limits: every bound the connector puts on what one guest may cost.

A host runs many guests and trusts none of them, so each limit protects the others. Each
is a named setting with a default that a well-behaved management agent never meets, and
the reason for the default next to it, in the manner of h11's buffer limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .errors import ConfigError


@dataclass(frozen=True)
class GuestLimits:
    """What one guest connection may use. ``[limits]`` in the configuration file."""

    # Largest frame we accept from a guest. 64 KiB lets a frame carry a typical management
    # message whole while capping what proton must buffer before it can decode anything.
    max_frame_size: int = 65536
    # Sessions per guest connection (AMQP channel-max + 1). Agents use one or two; a guest
    # that opens thousands is costing the broker, not doing management.
    max_sessions: int = 32
    # Links per guest connection, over all its sessions: each one is a broker link too.
    max_links: int = 256
    # Unsettled deliveries per link in either direction: bounds the in-flight map. A guest
    # sending more is refused; for one receiving, the broker is given no more credit until
    # it settles (each held message is a proton delivery in both engines: memory).
    max_unsettled_per_link: int = 10000
    # Largest message a guest may send (bytes); 0 means no limit beyond the broker's. Large
    # messages stream through in pieces, so memory does not grow with this.
    max_message_size: int = 100 * 1024 * 1024
    # The guest must finish SASL and open within this time of its protocol header.
    open_timeout_s: float = 10.0
    # Link attaches per second, averaged over a burst of ``attach_burst``.
    attach_rate: float = 50.0
    attach_burst: int = 100
    # Our idle timeout towards the guest: a guest silent this long is presumed dead (the
    # host sees nothing when a guest's port closes, so this is how a dead guest is noticed).
    idle_timeout_s: float = 60.0
    # The shortest idle timeout a guest may ask of us. We heartbeat at half of it; a guest
    # asking for 1 ms would have the shared loop wake 2,000 times a second for it alone.
    min_idle_timeout_s: float = 1.0

    @classmethod
    def from_table(cls, table: dict, where: str = "limits") -> GuestLimits:
        """Build from a TOML table; unknown keys and bad values name the key."""
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"{where}.{key}", "unknown setting")
            default = getattr(cls, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.{key}", f"must be a number, not {value!r}")
            if isinstance(default, int) and not isinstance(value, int):
                raise ConfigError(f"{where}.{key}", f"must be a whole number, not {value!r}")
            if value < 0:
                raise ConfigError(f"{where}.{key}", "must not be negative")
            if not math.isfinite(value):
                raise ConfigError(f"{where}.{key}", f"must be a finite number, not {value!r}")
            values[key] = value
        limits = cls(**values)
        if limits.max_frame_size < 512:
            raise ConfigError(f"{where}.max_frame_size", "AMQP's minimum is 512")
        if limits.max_sessions < 1:
            raise ConfigError(f"{where}.max_sessions", "must be at least 1")
        return limits
