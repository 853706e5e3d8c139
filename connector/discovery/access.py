"""Whose rights a file is used with for a qemu: that qemu's user's, not the daemon's.

qemu reads its config files as the user it runs as. Discovery reads them again as the
daemon, which is root or holds CAP_DAC_OVERRIDE, and what they say (a guest's name, its
ports, their paths) goes where the qemu's user may see it: the status, the logs, the
metrics. A file that user may not read must therefore not be read for its qemu, or the
user would learn what it says by naming it (or by replacing a file qemu has read with a
link to it).

The same holds for the socket a ``unix-listen`` channel binds where qemu's command line
says: made and removed with the daemon's rights, it could stand where a service will look
for its own, or replace one. So the connector makes it only where qemu's user could have
(:meth:`Credentials.check_may_replace`).

The check is the kernel's, on the mode bits: read permission on the file (write and search
on a directory that gets a new name), and search permission on every directory of the path
the file was opened by (as the kernel resolved it for the daemon), for the process's
file-system uid, gid and supplementary groups (``/proc/PID/status``), unless its effective
capabilities pass over modes. POSIX ACLs and LSMs (SELinux, AppArmor), which may grant or
deny one user more than the modes say, are not consulted.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from connector.discovery.reading import proc_status

# Capability numbers (linux/capability.h). Either of the first two lets a process read any
# file and search any directory, whatever the modes say; only CAP_DAC_OVERRIDE lets it
# write any directory too. CAP_FOWNER lets it remove another user's file from a sticky
# directory (/tmp).
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_FOWNER = 3
_READS_ALL = (1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)
_WRITES_ALL = 1 << CAP_DAC_OVERRIDE
# The read, write and search (x) bits of one class (owner, group, other) in a mode.
_READ = 0o4
_WRITE = 0o2
_SEARCH = 0o1
# /proc/PID/status lists real, effective, saved and file-system ids; files are opened
# with the last.
_FS_ID = 3


class NotReadable(OSError):
    """The process could not have read the file: the modes refuse it."""


class NotPermitted(OSError):
    """The process could not have made (or removed) the name: the modes refuse it. The
    message says where, as ``may not write /run/dbus``."""


@dataclass(frozen=True)
class Credentials:
    """What a process's file accesses are checked against."""

    uid: int  # file-system uid
    gids: frozenset[int]  # file-system gid and supplementary groups
    caps: int  # its effective capabilities, one bit each (CapEff)

    def may(self, st: os.stat_result, want: int) -> bool:
        """Whether the modes in ``st`` grant ``want`` (``_READ``, ``_WRITE``, ``_SEARCH``,
        or'ed): the owner's bits for the owner, else the group's for a member, else the
        others'; or a capability passes over them (only CAP_DAC_OVERRIDE for a write)."""
        if self.caps & (_WRITES_ALL if want & _WRITE else _READS_ALL):
            return True
        if st.st_uid == self.uid:
            granted = st.st_mode >> 6
        elif st.st_gid in self.gids:
            granted = st.st_mode >> 3
        else:
            granted = st.st_mode
        return granted & want == want

    def check_readable(self, named: int) -> None:
        """:class:`NotReadable` unless the process could open for reading the file that
        ``named`` (an ``O_PATH`` descriptor) stands for, by the path it was reached at.

        That path is the kernel's (``/proc/self/fd``), links resolved, so a link the user
        planted proves nothing: the directories checked are those of the file itself.
        """
        if not self.may(os.fstat(named), _READ):
            raise NotReadable("the file's modes")
        path = _kernel_path(named)
        if path is None:
            raise NotReadable("no path leads to it")
        if self._unsearchable(os.path.dirname(path)) is not None:
            raise NotReadable("a directory on its path")

    def check_may_replace(self, directory: int, there: os.stat_result | None) -> None:
        """:class:`NotPermitted` unless the process could make a name in ``directory`` (an
        ``O_PATH`` descriptor), and remove ``there``, the file that has the name now.

        As the kernel asks: search permission on each directory of the path that leads to
        ``directory`` (the kernel's, links resolved), write and search on ``directory``
        itself, and in a sticky directory (``/tmp``) the file or the directory its own.
        The directory is checked on the descriptor, which is where the name will be made:
        a link put in place of a directory afterwards cannot move it.
        """
        path = _kernel_path(directory)
        if path is None:
            raise NotPermitted("may not reach the directory: no path leads to it")
        shown = os.fsdecode(path)
        blocked = self._unsearchable(os.path.dirname(path))
        if blocked is not None:
            raise NotPermitted(f"may not search {os.fsdecode(blocked)}")
        st = os.fstat(directory)
        if not self.may(st, _WRITE | _SEARCH):
            raise NotPermitted(f"may not write {shown}")
        sticky = st.st_mode & stat.S_ISVTX and not self.caps & (1 << CAP_FOWNER)
        if there is not None and sticky and self.uid not in (there.st_uid, st.st_uid):
            raise NotPermitted(f"may not remove another user's file from {shown} (sticky)")

    def _unsearchable(self, directory: bytes) -> bytes | None:
        """The first of ``directory`` and the directories above it that the process may
        not search (or that is not a directory), or ``None``: it could reach them all."""
        while True:
            st = os.stat(directory)
            if not stat.S_ISDIR(st.st_mode) or not self.may(st, _SEARCH):
                return directory
            if directory == b"/":
                return None
            directory = os.path.dirname(directory)


def _kernel_path(named: int) -> bytes | None:
    """The path the kernel has for the file a descriptor names (links resolved), or
    ``None`` when no path leads to it (deleted, or outside the daemon's root)."""
    path = os.readlink(f"/proc/self/fd/{named}".encode())
    return path if path.startswith(b"/") else None


def credentials(pid: int, proc_root: str) -> Credentials | None:
    """A process's credentials from ``/proc/PID/status``, or ``None`` if it is gone."""
    status = proc_status(pid, proc_root)
    try:
        uid = int(status["Uid"][_FS_ID])
        gid = int(status["Gid"][_FS_ID])
        groups = frozenset(int(g) for g in status.get("Groups", []))
        caps = int(status["CapEff"][0], 16)
    except (KeyError, IndexError, ValueError):
        return None
    return Credentials(uid, groups | {gid}, caps)
