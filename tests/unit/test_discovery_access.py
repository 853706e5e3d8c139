"""Whether a qemu's user could make (and remove) a name in a directory: the kernel's rules
on the modes, asked of real directories for credentials written out here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connector.discovery.access import (
    CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH,
    CAP_FOWNER,
    Credentials,
    NotPermitted,
)
from tests.unit.test_discovery_resolve import OTHER_UID as OTHER
from tests.unit.test_discovery_resolve import QEMU_UID as USER
from tests.unit.test_discovery_resolve import open_tmp

__all__ = ["open_tmp"]  # a fixture, used by name
GROUP = 4444


def user(*caps: int, groups: tuple[int, ...] = ()) -> Credentials:
    return Credentials(USER, frozenset({USER, *groups}), sum(1 << cap for cap in caps))


def check(who: Credentials, directory: Path, there: Path | None = None) -> str | None:
    """Why ``who`` may not make a name in ``directory`` and remove ``there``, or None."""
    held = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        who.check_may_replace(held, None if there is None else os.lstat(there))
    except NotPermitted as why:
        return str(why)
    finally:
        os.close(held)
    return None


def file_of(path: Path, uid: int) -> Path:
    """A file at ``path`` that ``uid`` owns."""
    path.touch()
    os.chown(path, uid, uid)
    return path


@pytest.fixture
def base(open_tmp: Path) -> Path:
    return open_tmp


def test_a_directory_of_its_own_or_its_groups_may_be_written(base: Path) -> None:
    own = base / "own"
    own.mkdir(mode=0o755)
    os.chown(own, USER, USER)
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    os.chown(shared, 0, GROUP)
    assert check(user(), own) is None
    assert check(user(), shared) == f"may not write {shared}"
    assert check(user(groups=(GROUP,)), shared) is None


def test_a_directory_it_cannot_reach_is_refused_even_if_writable(base: Path) -> None:
    closed = base / "closed"
    closed.mkdir(mode=0o700)
    inside = closed / "open"
    inside.mkdir()
    inside.chmod(0o777)
    assert check(user(), inside) == f"may not search {closed}"
    assert check(user(CAP_DAC_READ_SEARCH), inside) is None  # searches anything


def test_only_dac_override_writes_what_the_modes_refuse(base: Path) -> None:
    roots = base / "roots"
    roots.mkdir(mode=0o755)
    assert check(user(CAP_DAC_READ_SEARCH), roots) == f"may not write {roots}"
    assert check(user(CAP_DAC_OVERRIDE), roots) is None


def test_a_sticky_directory_keeps_another_users_file(base: Path) -> None:
    sticky = base / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    theirs, mine = (file_of(sticky / name, uid) for name, uid in (("a", OTHER), ("b", USER)))
    refused = f"may not remove another user's file from {sticky} (sticky)"
    assert check(user(), sticky, theirs) == refused
    assert check(user(), sticky) is None  # a new name is fine
    assert check(user(), sticky, mine) is None
    assert check(user(CAP_FOWNER), sticky, theirs) is None
    os.chown(sticky, USER, USER)  # the directory's owner removes anything in it
    assert check(user(), sticky, theirs) is None
