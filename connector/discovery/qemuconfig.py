"""qemu's ``-readconfig`` file format, read the way qemu reads it.

A file of sections, each a group header and ``key = "value"`` lines::

    # comment
    [chardev "ch0"]
      backend = "socket"
      path = "/run/vm/amqp.sock"   # anything after the closing quote is ignored

qemu 7.2's ``qemu_config_foreach`` (util/qemu-config.c) reads it with ``fgets`` into a
1024-byte buffer and ``sscanf``. Discovery must read what qemu read, so this module keeps
sscanf's quirks rather than a tidier grammar: a line of more than 1023 bytes is read as
several lines; names are cut at 63 bytes; a key line only needs its key (``key`` alone, or
``key = x`` without quotes, sets an empty value); ``[`` must start the line, ``#`` only
comments at the start of a line, and a line of blanks is an error. Pure: bytes in,
sections out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from connector.discovery.reading import decode

# ``char line[1024]`` read by fgets: a longer line comes in pieces of this many bytes.
QEMU_LINE_BYTES = 1023
# sscanf's whitespace (C's isspace in the C locale).
_WS = rb"[ \t\n\v\f\r]"
_NOT_WS = rb"[^ \t\n\v\f\r]"
# The patterns below are qemu's sscanf formats, one for one; ``{1,63}+`` is possessive, as
# a sscanf conversion takes what it can and never gives it back.
# "[%63s \"%63[^\"]\"]": a group with an id (the closing quote and bracket go unchecked).
_HEADER_WITH_ID = re.compile(rb'\[%s*(%s{1,63}+)%s*"([^"]{1,63}+)' % (_WS, _NOT_WS, _WS))
# "[%63[^]]]": a group without one.
_HEADER = re.compile(rb"\[([^\]]{1,63}+)")
# " %63s = \"%1023[^\"]\"", and failing its value " %63s = \"\"", which any key matches.
_KEY = re.compile(rb"%s*(%s{1,63}+)" % (_WS, _NOT_WS))
_VALUE = re.compile(rb'%s*=%s*"([^"]{1,1023}+)' % (_WS, _WS))


@dataclass(frozen=True)
class ConfigSection:
    """One ``[group "id"]`` and its keys; the id, when the header names one, is ``id``, as
    qemu puts it (a later ``id = ...`` line replaces it, as in qemu)."""

    group: str
    options: dict[str, str]


class ConfigSyntaxError(ValueError):
    """A line qemu would have refused (so the file changed since qemu read it, or qemu
    never started with it); the message says which line, never what it holds."""


def parse_config(raw: bytes) -> list[ConfigSection]:
    """The sections of a config file, in order; :class:`ConfigSyntaxError` where qemu
    stops with an error (a key before any group, a line of blanks)."""
    sections: list[ConfigSection] = []
    for number, line in enumerate(_fgets_lines(raw), start=1):
        if line[:1] in (b"\n", b"#"):
            continue
        text = line.split(b"\0", 1)[0]  # sscanf sees the line up to its first NUL
        header = _header(text) if line[:1] == b"[" else None
        if header is not None:
            sections.append(header)
            continue
        key = _KEY.match(text)
        if key is None:
            raise ConfigSyntaxError(f"line {number}: parse error")
        if not sections:
            raise ConfigSyntaxError(f"line {number}: no group defined")
        value = _VALUE.match(text, key.end())
        sections[-1].options[decode(key[1])] = decode(value[1]) if value else ""
    return sections


def _header(text: bytes) -> ConfigSection | None:
    """A group header, or ``None`` when neither of qemu's header formats matches (qemu then
    reads the line as a key line)."""
    with_id = _HEADER_WITH_ID.match(text)
    if with_id is not None:
        return ConfigSection(decode(with_id[1]), {"id": decode(with_id[2])})
    without = _HEADER.match(text)
    return None if without is None else ConfigSection(decode(without[1]), {})


def _fgets_lines(raw: bytes) -> list[bytes]:
    """The file in the pieces fgets returns: each line with its newline, and a line longer
    than the buffer in pieces of :data:`QEMU_LINE_BYTES`."""
    pieces: list[bytes] = []
    start = 0
    while start < len(raw):
        newline = raw.find(b"\n", start, start + QEMU_LINE_BYTES)
        stop = start + QEMU_LINE_BYTES if newline < 0 else newline + 1
        pieces.append(raw[start:stop])
        start = stop
    return pieces
