"""Whose rights a file is read with for a qemu: that qemu's user's, not the daemon's.

qemu reads its config files as the user it runs as. Discovery reads them again as the
daemon, which is root or holds CAP_DAC_OVERRIDE, and what they say (a guest's name, its
ports, their paths) goes where the qemu's user may see it: the status, the logs, the
metrics. A file that user may not read must therefore not be read for its qemu, or the
user would learn what it says by naming it (or by replacing a file qemu has read with a
link to it).

The check is the kernel's, on the mode bits: read permission on the file, and search
permission on every directory of the path the file was opened by (as the kernel resolved
it for the daemon), for the process's file-system uid, gid and supplementary groups
(``/proc/PID/status``), unless its effective capabilities read past modes. POSIX ACLs and
LSMs (SELinux, AppArmor), which may grant or deny one user more than the modes say, are
not consulted.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from connector.discovery.reading import proc_status

# Capability numbers (linux/capability.h): either lets a process read any file and
# search any directory, whatever the modes say.
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
_READS_ALL = (1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)
# The read and search (x) bits of one class (owner, group, other) in a mode.
_READ = 0o4
_SEARCH = 0o1
# /proc/PID/status lists real, effective, saved and file-system ids; files are opened
# with the last.
_FS_ID = 3


class NotReadable(OSError):
    """The process could not have read the file: the modes refuse it."""


@dataclass(frozen=True)
class Credentials:
    """What a process's file accesses are checked against."""

    uid: int  # file-system uid
    gids: frozenset[int]  # file-system gid and supplementary groups
    reads_all: bool  # CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH in its effective set

    def may(self, st: os.stat_result, want: int) -> bool:
        """Whether the modes in ``st`` grant ``want`` (``_READ``, ``_SEARCH``): the
        owner's bits for the owner, else the group's for a member, else the others'."""
        if self.reads_all:
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
        path = os.readlink(f"/proc/self/fd/{named}".encode())
        if not path.startswith(b"/"):
            raise NotReadable("no path leads to it")
        directory = path
        while directory != b"/":
            directory = os.path.dirname(directory)
            st = os.stat(directory)
            if not stat.S_ISDIR(st.st_mode) or not self.may(st, _SEARCH):
                raise NotReadable("a directory on its path")


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
    return Credentials(uid, groups | {gid}, bool(caps & _READS_ALL))
