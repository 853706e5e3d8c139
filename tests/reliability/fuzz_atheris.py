"""atheris entry point: ``python -m tests.reliability.fuzz_atheris [libFuzzer flags] CORPUS``.

The first input byte picks the read size, the rest is the guest's stream; the properties are
``rig.run_hostile``'s, and any AssertionError or other exception is a crash atheris reports
with the input that caused it.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from tests.reliability import rig

_GOOD: list[rig.GoodGuest] = []


def one_input(data: bytes) -> None:
    """Run one input; the good guest is shared by all of them, as in the hypothesis run."""
    if not data:
        return
    if not _GOOD:
        _GOOD.append(rig.GoodGuest())
    chunk = max(data[0] * 16, -(-len(data) // 40))
    rig.run_hostile(data[1:], chunk, _GOOD[0])


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
