"""How discovery reads what other programs wrote: /proc and files, always as valid Unicode.

Whoever may run qemu chooses its command line, and so a guest's name, port names and
paths, as arbitrary bytes. Those strings end up in logs, the control socket's JSON, the
metrics page and ``qpid-virtio-status``; a lone surrogate (what ``surrogateescape`` makes
of a byte that is not UTF-8) breaks each of them when it is encoded. So every byte string
discovery reads is decoded here, once, as UTF-8 with ``backslashreplace``: valid UTF-8 reads
as itself, and a stray byte reads as ``\\xNN``, visible and harmless. Every reader in
``connector.discovery`` goes through these functions.

A path decoded this way is not the file's real name when it held such a byte; see
:func:`is_text` for the paths that come from the file system itself.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

ENCODING = "utf-8"
ERRORS = "backslashreplace"


def decode(raw: bytes) -> str:
    """Bytes from /proc or a file as text: UTF-8, a byte that is not shown as ``\\xNN``."""
    return raw.decode(ENCODING, ERRORS)


def read_bytes(path: str, limit: int = -1) -> bytes | None:
    """A file's bytes (at most ``limit``, or all), or ``None`` if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return None


def read_regular_file(path: str, limit: int, check: Callable[[int], None]) -> bytes:
    """At most ``limit`` bytes of a regular file that ``check`` lets be read (it is given
    the ``O_PATH`` descriptor, and raises OSError to refuse); OSError for anything else.
    ``check`` comes first, so that whoever it refuses learns nothing of what the name is.

    For a file someone else named. Opening a device may act (a watchdog starts counting
    down, a tape rewinds) and a FIFO blocks until a writer comes, so the type is checked
    before the file is opened for reading: on a descriptor that only names it (``O_PATH``
    opens nothing), which is then reopened through ``/proc/self/fd``, so that the name
    cannot be pointed elsewhere in between.

    A file no name leads to (no link left) is refused too: a deleted file, or a memfd,
    can only be reached through a descriptor, such as ``/proc/PID/fd/N`` of the daemon's
    own pid, and then it is the daemon's, not what the name meant to whoever wrote it.
    """
    named = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        check(named)
        st = os.fstat(named)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("not a regular file")
        if st.st_nlink == 0:
            raise OSError("a file no name leads to (deleted, or reached through a descriptor)")
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        with open(os.open(f"/proc/self/fd/{named}", flags), "rb") as f:
            return f.read(limit)
    finally:
        os.close(named)


def read_text(path: str) -> str | None:
    """A file's text (see :func:`decode`), or ``None`` if it cannot be read."""
    raw = read_bytes(path)
    return None if raw is None else decode(raw)


def proc_status(pid: int, proc_root: str) -> dict[str, list[str]]:
    """``/proc/PID/status`` as each key's fields (``Uid: 0 0 0 0`` → ``["0", "0", "0",
    "0"]``); empty if the process is gone. A process cannot disguise these lines, unlike
    the owner of ``/proc/PID`` (root's for a process made undumpable)."""
    fields: dict[str, list[str]] = {}
    for line in (read_text(f"{proc_root}/{pid}/status") or "").splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key, value.split())
    return fields


def readlink(path: str) -> str | None:
    """A symlink's target as text (see :func:`decode`), or ``None``."""
    try:
        return decode(os.readlink(os.fsencode(path)))
    except OSError:
        return None


def is_text(text: str) -> bool:
    """Whether a string holds no lone surrogate, i.e. can be written out as UTF-8.

    Strings that did not come through :func:`decode` may: a directory entry the ``os``
    module read (a byte that is not UTF-8 becomes a surrogate, which must stay to open the
    file, so such a path is refused rather than decoded), or a JSON ``\\udXXX`` escape.
    """
    try:
        text.encode(ENCODING)
    except UnicodeEncodeError:
        return False
    return True
