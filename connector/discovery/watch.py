"""Watch glob patterns of absolute paths with inotify: which matching paths appeared or went.

inotify watches single directories, so a pattern such as
``/var/lib/libvirt/qemu/channel/target/*/org.qpid.amqp.*`` is watched level by level: the
deepest existing directory of its fixed prefix, then every directory matching each wildcard
level, added as they appear. Rather than keeping that state up to date event by event, any
relevant event re-reads the (small) matching tree and compares it with the last result:
one code path for start-up, new directories, deletions, renames and queue overflow.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from connector.discovery.inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Inotify,
)

_DIR_MASK = (
    IN_CREATE
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CLOSE_WRITE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
# Events about the watch itself, or lost events: always worth a full re-read.
_RESYNC_MASK = IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF
# A directory that went (or was never one) between listing and watching: not a refusal,
# its parent's event makes the next re-read.
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})


def is_socket(st: os.stat_result) -> bool:
    """Accept only sockets: what a qemu ``server=on`` chardev leaves in its directory."""
    return stat.S_ISSOCK(st.st_mode)


def is_regular_file(st: os.stat_result) -> bool:
    """Accept only regular files, such as libvirt's status XML."""
    return stat.S_ISREG(st.st_mode)


@dataclass
class Changes:
    """What changed since the last look: new matches, vanished ones, ones replaced by a
    new file of the same name (another inode: for a socket, another listener, maybe
    another qemu's), rewritten ones (same inode), and directories newly refused
    (``DIR: reason``, such as permission denied)."""

    appeared: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    touched: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def _components(pattern: str) -> list[str]:
    if not pattern.startswith("/"):
        raise ValueError(f"watch pattern {pattern!r} is not absolute")
    return [c for c in pattern.split("/") if c]


def _anchor(parts: list[str]) -> tuple[str, int]:
    """The deepest existing directory along the pattern's fixed prefix, and its depth."""
    current, depth = "/", 0
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        candidate = os.path.join(current, part)
        if not os.path.isdir(candidate):
            break
        current, depth = candidate, depth + 1
    return current, depth


class GlobWatch:
    """Matches of some absolute glob patterns, kept current with one inotify descriptor."""

    def __init__(self, patterns: Sequence[str], accept: Callable[[os.stat_result], bool]):
        self._patterns = [_components(p) for p in patterns]
        self._accept = accept
        self._inotify = Inotify()
        self._wd_dir: dict[int, str] = {}
        # Each watched directory with the (pattern, depth) pairs that put it there.
        self._dir_levels: dict[str, set[tuple[int, int]]] = {}
        self._matches: dict[str, int] = {}  # each match's inode
        self._refused: dict[str, str] = {}  # directory -> why it cannot be watched or read

    def fileno(self) -> int:
        return self._inotify.fileno()

    @property
    def matches(self) -> frozenset[str]:
        return frozenset(self._matches)

    def start(self) -> Changes:
        """Set up the watches; everything that matches already is reported as appeared."""
        return self._sync()

    def read(self) -> Changes:
        """Call when the descriptor is readable: what changed since the last call.

        A name created (or renamed to) since the last look is a new file even when the
        file system handed the old one's inode number straight to it, as ext4 does to a
        socket unlinked and bound again once nothing holds the old one.
        """
        touched: set[str] = set()
        created: set[str] = set()
        relevant = False
        for event in self._inotify.read_events():
            directory = self._wd_dir.get(event.wd)
            if event.mask & IN_IGNORED:
                self._wd_dir.pop(event.wd, None)
            if event.mask & _RESYNC_MASK:
                relevant = True
                continue
            if directory is None or not event.name:
                continue
            for index, depth in self._dir_levels.get(directory, ()):
                if fnmatch.fnmatchcase(event.name, self._patterns[index][depth]):
                    relevant = True
                    touched.add(os.path.join(directory, event.name))
                    if event.mask & (IN_CREATE | IN_MOVED_TO):
                        created.add(os.path.join(directory, event.name))
        if not relevant:
            return Changes()
        changes = self._sync(frozenset(created))
        news = {*changes.appeared, *changes.replaced}
        changes.touched = sorted(p for p in touched if p in self._matches and p not in news)
        return changes

    def close(self) -> None:
        self._inotify.close()

    def _sync(self, created: frozenset[str] = frozenset()) -> Changes:
        """Re-read the matching trees, move the watches to fit, and report the difference.

        A match is ``replaced`` when its inode differs or its name was ``created`` since
        the last look (after a queue overflow, the inode alone tells)."""
        levels: dict[str, set[tuple[int, int]]] = {}
        found: dict[str, int] = {}
        refused: dict[str, str] = {}
        for index, parts in enumerate(self._patterns):
            anchor, depth = _anchor(parts)
            self._walk(index, parts, anchor, depth, levels, found, refused)
        for directory in self._dir_levels.keys() - levels.keys():
            for wd in [wd for wd, d in self._wd_dir.items() if d == directory]:
                self._inotify.rm_watch(wd)
                del self._wd_dir[wd]
        self._dir_levels = levels
        kept = found.keys() & self._matches.keys()
        changes = Changes(
            appeared=sorted(found.keys() - self._matches.keys()),
            gone=sorted(self._matches.keys() - found.keys()),
            replaced=sorted(p for p in kept if p in created or found[p] != self._matches[p]),
            refused=[f"{d}: {why}" for d, why in sorted(refused.items()) if d not in self._refused],
        )
        self._matches = found
        self._refused = refused
        return changes

    def _walk(
        self,
        index: int,
        parts: list[str],
        directory: str,
        depth: int,
        levels: dict[str, set[tuple[int, int]]],
        found: dict[str, int],
        refused: dict[str, str],
    ) -> None:
        # Watch before listing, so an entry created in between is seen by one or the other.
        try:
            wd = self._inotify.add_watch(directory, _DIR_MASK)
            self._wd_dir[wd] = directory
            levels.setdefault(directory, set()).add((index, depth))
            entries = list(os.scandir(directory))
        except OSError as exc:
            # Gone meanwhile: its parent's event resyncs. Anything else (permission denied,
            # no inotify watches left) hides whatever is below: the caller must say so.
            if exc.errno not in _GONE_ERRNOS:
                refused[directory] = os.strerror(exc.errno) if exc.errno else str(exc)
            return
        last = depth == len(parts) - 1
        for entry in entries:
            if not fnmatch.fnmatchcase(entry.name, parts[depth]):
                continue
            try:
                # A match itself must be what it seems, not a symlink: qemu's user owns the
                # channel directories, and a link there could name any socket on the host.
                st = entry.stat(follow_symlinks=not last)
            except OSError:
                continue
            if last:
                if self._accept(st):
                    found[entry.path] = st.st_ino
            elif stat.S_ISDIR(st.st_mode):
                self._walk(index, parts, entry.path, depth + 1, levels, found, refused)
