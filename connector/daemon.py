"""The daemon: one asyncio loop that owns every channel, the control socket and discovery.

It is the only place that starts and stops things: channels from the configuration and
from discovery, the control and metrics servers, and the signal handlers (SIGTERM: close
every guest connection and upstream cleanly, then exit 0; SIGHUP: re-read the configuration,
apply the channel list's difference without touching unchanged channels, and a changed
``[broker]`` to the upstream connections opened after it).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import time
from dataclasses import replace
from typing import Any

from . import config as config_mod
from . import state
from .broker_reload import CurrentBrokers
from .channel import Channel, ChannelState
from .config import Config
from .control.metrics import MetricsServer, parse_listen_address
from .control.server import ControlServer
from .discovery import Discovery
from .errors import ConfigError
from .identity import ChannelSpec
from .notify import notify

log = logging.getLogger("connector")

# How long SIGTERM waits for guests and broker to finish their close exchanges.
SHUTDOWN_GRACE_S = 5.0
# How long a gone channel stays listed, so an operator sees that a guest went away.
GONE_RETENTION_S = 600.0
# The kernel's ceiling on a process's open files (fs.nr_open's default), used when the hard
# limit is "unlimited", which setrlimit does not accept as a soft limit.
NR_OPEN_DEFAULT = 1 << 20


def raise_fd_limit() -> tuple[int, int]:
    """Lift the soft limit on open files to the hard limit; returns (before, after).

    Each connected guest costs the daemon two descriptors (its channel and its broker
    connection), a unix-listen channel one more. systemd and most shells start a service at
    a soft limit of 1024 for the sake of ``select()``, which the daemon does not use (its
    loop is epoll), so without this a host with a few hundred guests would run out and
    refuse guests with EMFILE while the hard limit allows far more.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NR_OPEN_DEFAULT if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as err:  # e.g. fs.nr_open set below the hard limit
            log.warning("could not raise the open-file limit from %d: %s", soft, err)
            return soft, soft
        return soft, target
    return soft, soft


class Daemon:
    """Serve every channel until told to stop."""

    def __init__(self, config: Config, flags: dict[str, Any] | None = None) -> None:
        self.config = config
        self._flags = flags or {}
        self.channels: dict[str, Channel] = {}
        self._static: dict[str, ChannelSpec] = {}
        self._discovered: dict[str, ChannelSpec] = {}
        self._brokers = CurrentBrokers(config.upstream)
        self._started = time.time()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._control: ControlServer | None = None
        self._metrics: MetricsServer | None = None
        self._discovery: Discovery | None = None
        self._prune: asyncio.TimerHandle | None = None

    # -- StateSource ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The state the control socket and the metrics endpoint serve."""
        return state.snapshot(
            self.channels.values(),
            started=self._started,
            upstream_urls=[str(u) for u in self.config.upstream.urls],
            discovery=self._discovery.stats() if self._discovery else {},
        )

    # -- DiscoverySink -------------------------------------------------------------------

    def channel_appeared(self, spec: ChannelSpec) -> None:
        """Discovery found a channel; serve it unless the configuration names that path.

        The spec is kept even then: discovery reports a path once, so if a reload later
        takes the path out of the configuration, this is what serves the running VM.
        """
        self._discovered[spec.path] = spec
        if spec.path in self._static:
            return
        ch = self.channels.get(spec.path)
        gone = ch is not None and ch.state is ChannelState.GONE
        self._apply(frozenset({spec.path}) if gone else frozenset())

    def channel_gone(self, path: str, reason: str) -> None:
        """Discovery says the VM behind ``path`` is gone (a configured path is left alone)."""
        if self._discovered.pop(path, None) is None or path in self._static:
            return
        ch = self.channels.get(path)
        if ch is not None and ch.state is not ChannelState.GONE:
            ch.close(reason, gone=True)
            self._apply()  # refreshes the systemd status line

    # -- running -------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit status."""
        self._loop = asyncio.get_running_loop()
        before, after = raise_fd_limit()
        if after != before:
            log.info("open-file limit raised from %d to %d", before, after)
        cfg = self.config
        self._control = ControlServer(
            cfg.control_socket, self, mode=cfg.control_mode, group=cfg.control_group
        )
        await self._control.start()
        if cfg.metrics:
            host, port = parse_listen_address(cfg.metrics)
            self._metrics = MetricsServer(host, port, self)
            await self._metrics.start()
        self._static = {spec.path: spec for spec in cfg.channels}
        self._apply()
        if cfg.discovery is not None:
            self._discovery = Discovery(cfg.discovery, self, self._loop, log)
            self._discovery.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._stop.set)
        self._loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._prune = self._loop.call_later(GONE_RETENTION_S, self._prune_gone)
        log.info(
            "serving %d channel(s); broker %s; control socket %s%s",
            len(self.channels),
            ", ".join(str(u) for u in cfg.upstream.urls),
            cfg.control_socket,
            "; discovery " + ",".join(sorted(cfg.discovery.sources)) if cfg.discovery else "",
        )
        notify(READY=1, STATUS=f"serving {len(self.channels)} channel(s)")
        await self._stop.wait()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        """Close every guest connection (``connection:forced``) and upstream, then stop."""
        notify(STOPPING=1)
        log.info("shutting down: closing %d channel(s)", len(self.channels))
        if self._discovery is not None:
            self._discovery.stop()
        for ch in self.channels.values():
            ch.close("connector shutting down", gone=False)
        waits = [ch.idle.wait() for ch in self.channels.values()]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), SHUTDOWN_GRACE_S)
            except TimeoutError:
                log.warning("some upstreams did not finish closing in %ss", SHUTDOWN_GRACE_S)
        if self._control is not None:
            await self._control.close()
        if self._metrics is not None:
            self._metrics.close()
        if self._prune is not None:
            self._prune.cancel()

    def stop(self) -> None:
        """Ask the daemon to shut down (as SIGTERM does)."""
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; apply the channel list and ``[broker]``.

        Unchanged channels keep their guests connected. A changed ``[broker]`` (a rotated
        password file included) is for the upstream connections opened from now on: the
        guests connected now keep theirs, as an nginx reload keeps its open connections.
        The new file is checked whole, its broker pool built, before anything is applied,
        so one mistake keeps all of the old configuration. A change anywhere else is named
        in one warning (and again on each reload until the restart that applies it), never
        dropped silently.
        """
        try:
            fresh = config_mod.load(self._flags)
            broker = self._brokers.prepare(fresh.upstream)
        except ConfigError as err:
            log.error("reload failed, keeping the old configuration: %s", err)
            return
        waiting = config_mod.sections_needing_restart(self.config, fresh)
        if waiting:
            log.warning(
                "reload: %s changed: not applied until the next restart "
                "(a reload applies the channel list and [broker])",
                ", ".join(f"[{section}]" for section in waiting),
            )
        if broker is not None:
            self._brokers.apply(broker)
            self.config = replace(self.config, upstream=fresh.upstream)
            log.info(
                "reload: [broker] applied to new connections: urls %s (changed: %s); "
                "guests connected now keep their broker connection",
                ", ".join(str(u) for u in fresh.upstream.urls),
                ", ".join(broker.changed),
            )
        self._static = {spec.path: spec for spec in fresh.channels}
        self._apply()
        log.info("reloaded: %d configured channel(s)", len(self._static))

    def _apply(self, restart: frozenset[str] = frozenset()) -> None:
        """Make the running channels match the wanted ones (configured + discovered).

        A channel whose spec is unchanged keeps running untouched; a removed one is closed
        and stays listed as gone until pruned; ``restart`` names gone channels to serve anew
        (a VM that came back on the same path).
        """
        wanted = {**self._discovered, **self._static}
        for path, ch in list(self.channels.items()):
            spec = wanted.get(path)
            if spec == ch.spec and path not in restart:
                continue
            if spec is None and ch.state is ChannelState.GONE:
                continue
            ch.close("channel removed" if spec is None else "channel changed", gone=True)
            if spec is not None:
                del self.channels[path]
        for path, spec in wanted.items():
            if path not in self.channels:
                self._start_channel(spec)
        if self._loop is not None:
            live = sum(1 for ch in self.channels.values() if ch.state is not ChannelState.GONE)
            notify(STATUS=f"serving {live} channel(s)")

    def _start_channel(self, spec: ChannelSpec) -> None:
        ch = Channel(
            spec,
            loop=self._loop,
            brokers=self._brokers,
            limits=self.config.limits,
            policy=self.config.policy.for_guest(spec.identity.name),
        )
        self.channels[spec.path] = ch
        ch.start()

    def _prune_gone(self) -> None:
        """Forget channels that have been gone for a while (their VM is long destroyed)."""
        now = time.time()
        for path, ch in list(self.channels.items()):
            stale = ch.state is ChannelState.GONE and now - ch.since > GONE_RETENTION_S
            if stale and path not in self._static and path not in self._discovered:
                del self.channels[path]
        self._prune = self._loop.call_later(GONE_RETENTION_S, self._prune_gone)
