"""Discovery: find every guest's AMQP channels without per-guest configuration.

``Discovery`` turns three kinds of news into ``channel_appeared`` / ``channel_gone`` calls
on the daemon's sink:

- **kvm**: the kernel's ``misc/kvm`` uevent for every VM created or destroyed, with the
  creating pid; the pid is resolved through libvirt's status XML or qemu's command line
  (``resolve``), and libvirt's file is looked for again for a few seconds if it is late.
- **watch**: inotify on the channel-socket globs (TCG guests send no KVM uevent; sockets
  may appear after the VM) and on libvirt's status directory.
- **start-up scan**: running qemu processes, status files and existing sockets, so that a
  restarted connector picks up running guests.

Each qemu pid found is also watched with a pidfd, so its channels go when it exits even
without a KVM ``destroy`` (TCG guests). Everything runs on the daemon's event loop through
``add_reader`` and ``call_later``; nothing here sleeps or blocks beyond reading /proc.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from connector.discovery.kvm import LOST, KvmEvent, KvmMonitor
from connector.discovery.libvirt import guest_from_channel_path
from connector.discovery.reading import decode, is_text
from connector.discovery.resolve import (
    distrust,
    qemu_pids,
    read_cmdline,
    read_status,
    resolve_pid,
)
from connector.discovery.settings import DiscoverySettings
from connector.discovery.watch import Changes, GlobWatch, is_regular_file, is_socket
from connector.identity import ChannelKind, ChannelSpec, GuestIdentity

__all__ = ["Discovery", "DiscoverySettings", "DiscoverySink"]

# Whoever runs qemu may give it 100,000 problems (ports without a chardev, missing config
# files) in its 2 MiB of arguments. A warning each, at the end of each window, would be
# megabytes of log for one VM and bury every other's: past this many, one line counts them.
MAX_PROBLEMS_LOGGED = 10


class DiscoverySink(Protocol):
    """Implemented by the daemon: what discovery reports."""

    def channel_appeared(self, spec: ChannelSpec) -> None: ...

    def channel_gone(self, path: str, reason: str) -> None: ...


@dataclass
class _Process:
    """A qemu process discovery knows of, and what it has reported for it."""

    pid: int
    paths: set[str] = field(default_factory=set)
    pidfd: int | None = None
    retry: asyncio.TimerHandle | None = None
    from_libvirt: bool = False
    deadline: float = 0.0  # monotonic end of the window for looking again (``_resolve``)
    unproven: frozenset[str] = frozenset()  # unix paths it named, not seen listening on


class Discovery:
    """Finds channels by itself and tells the sink; one instance per daemon."""

    def __init__(
        self,
        settings: DiscoverySettings,
        sink: DiscoverySink,
        loop: asyncio.AbstractEventLoop,
        log: logging.Logger,
    ) -> None:
        self.settings = settings
        self._sink = sink
        self._loop = loop
        self._log = log
        self._processes: dict[int, _Process] = {}
        # Every path reported as appeared, with the pid it belongs to (None: socket only).
        self._owners: dict[str, int | None] = {}
        self._listeners: set[str] = set()  # those of them the connector listens on
        self._kvm: KvmMonitor | None = None
        self._sockets: GlobWatch | None = None
        self._status: GlobWatch | None = None
        self._counters: Counter[str] = Counter()

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Open the live sources, then scan what runs already, then listen.

        The sources open before the scan so that nothing created during the scan is missed;
        what both see is reported once, because reports are keyed by path.
        """
        sources = self.settings.sources
        if "kvm" in sources:
            try:
                self._kvm = KvmMonitor(self.settings.udev_source)
            except OSError as exc:
                self._counters["errors"] += 1
                self._log.error("discovery: cannot listen for KVM uevents: %s", exc)
        if "watch" in sources:
            self._sockets = self._open_watch(list(self.settings.watch_globs), is_socket)
            if self.settings.watch_libvirt_status:
                pattern = os.path.join(self.settings.libvirt_status_dir, "*.xml")
                self._status = self._open_watch([pattern], is_regular_file)
        if sources:
            self._guarded(self._scan_processes, "scan")
        if self._status is not None:
            self._guarded(self._status_changed, self._status.start())
            self._loop.add_reader(self._status.fileno(), self._guarded, self._on_status)
        if self._sockets is not None:
            self._guarded(self._sockets_changed, self._sockets.start())
            self._loop.add_reader(self._sockets.fileno(), self._guarded, self._on_sockets)
        if self._kvm is not None:
            self._loop.add_reader(self._kvm.fileno(), self._guarded, self._on_kvm)
        self._log.info(
            "discovery: started (%s); %d channels found",
            ",".join(sorted(sources)) or "no sources",
            len(self._owners),
        )

    def stop(self) -> None:
        """Stop listening. Channels already reported stay with the daemon."""
        for source in (self._kvm, self._sockets, self._status):
            if source is not None:
                self._loop.remove_reader(source.fileno())
                source.close()
        self._kvm = self._sockets = self._status = None
        for process in self._processes.values():
            self._forget_process(process)
        self._processes.clear()

    def stats(self) -> dict[str, int]:
        """Event counters: events per source, channels found and gone, retries, errors.

        Only counters belong here, values that never go down while the daemon runs: the
        metrics endpoint exports every one as the Prometheus counter family
        ``qpid_virtio_discovery_events_total``, and a counter that goes down reads as a
        restart to ``rate()``. What discovery knows *now* rises and falls with the VMs, so
        it is in :meth:`gauges` instead.
        """
        return dict(self._counters)

    def gauges(self) -> dict[str, int]:
        """What discovery holds now: ``channels`` reported and not gone, qemu ``processes``
        taken up and not exited. Values go down as VMs go, unlike :meth:`stats`."""
        return {"channels": len(self._owners), "processes": len(self._processes)}

    def _open_watch(
        self, patterns: list[str], accept: Callable[[os.stat_result], bool]
    ) -> GlobWatch | None:
        try:
            return GlobWatch(patterns, accept)
        except (OSError, ValueError) as exc:
            self._counters["errors"] += 1
            self._log.error("discovery: cannot watch %s: %s", ", ".join(patterns), exc)
            return None

    def _guarded(self, handler: Callable[..., None], *args: object) -> None:
        """Run a handler so that one bad event cannot take a reader off the loop."""
        try:
            handler(*args)
        except Exception:
            self._counters["errors"] += 1
            self._log.exception("discovery: %s failed", getattr(handler, "__name__", handler))

    def _for_process(self, handler: Callable[..., None], pid: int, *args: object) -> None:
        """Run one VM's share of a scan or a batch of events: a failure costs that VM only
        (not the VMs after it) and is logged with the guest's name."""
        try:
            handler(pid, *args)
        except Exception:
            self._counters["errors"] += 1
            self._log.exception(
                "discovery: guest %s (qemu pid %d): %s failed; other guests go on",
                self._guest_name(pid),
                pid,
                handler.__name__,
            )

    def _guest_name(self, pid: int) -> str:
        """The name to log a failure under: qemu's ``-name``, or ``?`` when even reading
        it fails (the failure being logged may be in the parser)."""
        try:
            cmdline = read_cmdline(pid, self.settings)
        except Exception:
            return "?"
        return cmdline.name if cmdline is not None and cmdline.name else "?"

    # -- reporting -----------------------------------------------------------------------

    def _appear(self, spec: ChannelSpec, process: _Process | None) -> None:
        if not is_text(spec.path):
            # Only a directory entry can be such a path (``reading`` decodes what it reads):
            # it could be opened, but not named in the status, logs or metrics.
            self._counters["errors"] += 1
            shown = decode(os.fsencode(spec.path))
            self._log.warning("discovery: %s: the path is not UTF-8; ignored", shown)
            return
        known = spec.path in self._owners
        claimed = known and process is not None and self._owners[spec.path] is None
        if known and not claimed:
            return
        # A socket reported from its path alone may have been bound before its qemu ran
        # (libvirt passes it as ``fd=N``); now that the qemu claims it, it is reported
        # again with the name and UUID qemu was given, not the directory's short name.
        self._owners[spec.path] = process.pid if process is not None else None
        if process is not None:
            process.paths.add(spec.path)
        if spec.kind is ChannelKind.UNIX_LISTEN:
            self._listeners.add(spec.path)
        if not claimed:
            self._counters["channels_found"] += 1
        identity = spec.identity
        self._log.info(
            "discovery: guest %s port %s: %s %s (found by %s, pid %s)",
            identity.name,
            identity.port,
            spec.kind.value,
            spec.path,
            identity.found_by,
            identity.pid,
        )
        self._sink.channel_appeared(spec)

    def _gone(self, path: str, reason: str) -> None:
        if path not in self._owners:
            return
        pid = self._owners.pop(path)
        self._listeners.discard(path)
        if pid is not None and pid in self._processes:
            self._processes[pid].paths.discard(path)
        self._counters["channels_gone"] += 1
        self._log.info("discovery: channel %s gone: %s", path, reason)
        self._sink.channel_gone(path, reason)

    # -- processes -----------------------------------------------------------------------

    def _scan_processes(self, trigger: str) -> None:
        """Take up every running qemu not known yet."""
        for pid in qemu_pids(self.settings):
            if pid not in self._processes:
                self._for_process(self._take_process, pid, trigger)

    def _take_process(self, pid: int, trigger: str) -> None:
        why = distrust(pid, self.settings)
        if why is not None:
            self._counters["untrusted_pids"] += 1
            level = logging.WARNING if why.alarming else logging.INFO
            self._log.log(level, "discovery: pid %d (%s): %s; ignored", pid, trigger, why.reason)
            return
        process = _Process(pid=pid)
        self._processes[pid] = process
        self._counters[f"processes_{trigger}"] += 1
        try:
            process.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._drop_process(pid, "qemu exited")
            return
        except OSError as exc:  # kernels before 5.3: rely on KVM destroy and the watch
            self._log.debug("discovery: no pidfd for %d: %s", pid, exc)
        else:
            self._loop.add_reader(process.pidfd, self._guarded, self._on_exit, pid)
        process.deadline = time.monotonic() + self.settings.libvirt_retry_seconds
        self._resolve(process)

    def _resolve(self, process: _Process) -> None:
        """Report what the process's sources say now; look again later if that was not all.

        Two things are worth waiting for: libvirt's status file, written after qemu has
        started, and a qemu still creating its chardevs (a watched socket can appear before
        qemu has opened its next pty).

        libvirt's status file, once there, is the whole truth: it is the exact source, and
        libvirt rewrites it when a channel is hot-plugged or unplugged. A path of this
        process that it does not name is gone (a hot-unplugged channel, or the command
        line's reading of a port libvirt puts elsewhere). ``resolve_pid`` reads only the
        file of this qemu's name and pid.
        """
        resolution = resolve_pid(process.pid, self.settings)
        process.unproven = resolution.unproven
        if resolution.from_libvirt:
            process.from_libvirt = True
            named = {spec.path for spec in resolution.specs}
            for path in sorted(process.paths - named):
                self._gone(path, "channel removed from the domain")
        elif process.from_libvirt:
            return  # libvirt's file went (the domain is ending): what it said stands
        for spec in resolution.specs:
            self._appear(spec, process)
        libvirt_may_come = (
            not process.from_libvirt
            and resolution.libvirt_name is not None
            and os.path.isdir(self.settings.libvirt_status_dir)
        )
        if (resolution.problems or libvirt_may_come) and time.monotonic() < process.deadline:
            process.retry = self._loop.call_later(
                self.settings.libvirt_retry_interval, self._for_process, self._retry, process.pid
            )
            return
        guest = resolution.libvirt_name or "?"
        for problem in resolution.problems[:MAX_PROBLEMS_LOGGED]:
            self._log.warning("discovery: guest %s (qemu pid %d): %s", guest, process.pid, problem)
        if len(resolution.problems) > MAX_PROBLEMS_LOGGED:
            self._log.warning(
                "discovery: guest %s (qemu pid %d): %d more problems, not shown",
                guest,
                process.pid,
                len(resolution.problems) - MAX_PROBLEMS_LOGGED,
            )

    def _retry(self, pid: int) -> None:
        process = self._processes.get(pid)
        if process is None:
            return
        process.retry = None
        self._counters["retries"] += 1
        self._resolve(process)

    def _drop_process(self, pid: int, reason: str) -> None:
        process = self._processes.pop(pid, None)
        if process is None:
            return
        self._forget_process(process)
        for path in sorted(process.paths):
            self._gone(path, reason)

    @staticmethod
    def _cancel_retry(process: _Process) -> None:
        if process.retry is not None:
            process.retry.cancel()
            process.retry = None

    def _forget_process(self, process: _Process) -> None:
        self._cancel_retry(process)
        if process.pidfd is not None:
            self._loop.remove_reader(process.pidfd)
            os.close(process.pidfd)
            process.pidfd = None

    @staticmethod
    def _has_exited(process: _Process) -> bool:
        """Whether a qemu taken up has exited, though its pidfd has not been read yet."""
        if process.pidfd is None:
            return False
        poll = select.poll()
        poll.register(process.pidfd, select.POLLIN)
        return bool(poll.poll(0))

    def _on_exit(self, pid: int) -> None:
        self._counters["process_exits"] += 1
        self._drop_process(pid, "qemu exited")

    # -- sources -------------------------------------------------------------------------

    def _on_kvm(self) -> None:
        assert self._kvm is not None
        for event in self._kvm.read():
            self._kvm_event(event)

    def _kvm_event(self, event: KvmEvent) -> None:
        self._counters[f"kvm_{event.kind}"] += 1
        if event.kind == LOST:
            # Creates may be among the lost; exits are seen by the pidfds anyway.
            self._log.warning("discovery: the kernel dropped KVM uevents; scanning for qemu")
            self._scan_processes("scan")
        elif event.kind == "destroy":
            self._for_process(self._drop_process, event.pid, "VM destroyed")
        elif event.pid in self._processes:
            self._for_process(self._look_again, event.pid)
        else:
            self._for_process(self._take_process, event.pid, "kvm")

    def _look_again(self, pid: int) -> None:
        """Resolve a known qemu afresh, with a new window for looking again: when it
        creates its VM (a scan may have met it still starting, and its window may have
        closed; at ``create`` every chardev exists), and when libvirt writes its file."""
        process = self._processes[pid]
        self._cancel_retry(process)
        process.deadline = time.monotonic() + self.settings.libvirt_retry_seconds
        self._resolve(process)

    def _on_sockets(self) -> None:
        assert self._sockets is not None
        self._counters["watch_events"] += 1
        self._sockets_changed(self._sockets.read())

    def _refused(self, changes: Changes) -> None:
        """A directory the watch may not read hides every channel below it (the connector
        run outside the group that owns libvirt's channel directories): say so, once."""
        for refusal in changes.refused:
            self._counters["errors"] += 1
            self._log.warning("discovery: cannot watch %s; channels under it are not seen", refusal)

    def _sockets_changed(self, changes: Changes) -> None:
        self._refused(changes)
        # For a unix-listen channel the socket is the connector's own, bound, unlinked and
        # bound again as the daemon restarts the channel: in a watched directory, none of
        # that is news of qemu's.
        gone, replaced, fresh = (
            [p for p in paths if p not in self._listeners]
            for paths in (changes.gone, changes.replaced, changes.appeared)
        )
        for path in gone:
            self._gone(path, "socket removed")
        # A new socket where one was is a new listener, perhaps another qemu's (a qemu
        # without KVM restarted on the same path before the loop looked): the old channel
        # goes, and the new socket is looked at like any new one. The socket of a qemu
        # still running stays.
        for path in replaced:
            owner = self._owners.get(path)
            process = None if owner is None else self._processes.get(owner)
            if process is not None:
                if not self._has_exited(process):
                    continue
                self._on_exit(process.pid)  # before its pidfd is read
            self._gone(path, "socket replaced")
        appeared = [p for p in [*fresh, *replaced] if p not in self._owners]
        if not appeared:
            return
        # A new socket usually belongs to a qemu that has just started: take that qemu up
        # first, so the channel is reported with its full identity (pid, uuid). A qemu
        # already known that names the path, and was not listening there when looked at
        # (a slow start: that look may have been its last), gets a new window: its claim
        # counts once it listens there (the socket appears at its bind, before its listen).
        self._scan_processes("watch")
        for process in [p for p in self._processes.values() if p.unproven.intersection(appeared)]:
            self._for_process(self._look_again, process.pid)
        for path in appeared:
            if path not in self._owners:
                name, port = guest_from_channel_path(path, self.settings.port_patterns)
                identity = GuestIdentity(name=name, port=port, found_by="watch")
                self._appear(ChannelSpec(ChannelKind.UNIX, path, identity), None)

    def _on_status(self) -> None:
        assert self._status is not None
        self._counters["libvirt_status_events"] += 1
        self._status_changed(self._status.read())

    def _status_changed(self, changes: Changes) -> None:
        self._refused(changes)
        for path in [*changes.appeared, *changes.replaced, *changes.touched]:
            domain = read_status(path)
            if domain is None or domain.pid is None:
                continue
            if domain.pid in self._processes:
                # New or rewritten (a hot-plug): it counts only if it is this qemu's own.
                self._for_process(self._look_again, domain.pid)
            else:
                self._for_process(self._take_process, domain.pid, "libvirt")
