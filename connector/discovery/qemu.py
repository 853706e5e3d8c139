"""Read a qemu command line: the guest's name and UUID, its chardevs and virtio-serial ports.

Pure functions over the argument vector (``/proc/PID/cmdline`` split on NUL), so every
spelling qemu accepts can be tested without a qemu: keyval (``socket,id=c0,path=P,server=on``,
with ``,,`` for a literal comma), the old short booleans (``server``, ``nowait``), and the
JSON form (``-device '{"driver":"virtserialport",...}'``) that current libvirt uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from connector.discovery.reading import decode, is_text

# qemu's boolean spellings (qapi_bool_parse).
_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})
# -device drivers that are virtio-serial ports with a ``name`` the guest sees.
PORT_DRIVERS = frozenset({"virtserialport", "virtconsole"})


@dataclass(frozen=True)
class Chardev:
    """One ``-chardev``: its backend and, for a unix socket, where it is."""

    id: str
    backend: str  # "socket", "pty", ...
    path: str | None = None  # a unix socket's path
    fd: int | None = None  # a socket libvirt passed in as an open descriptor
    server: bool = False  # qemu listens (server=on) rather than connects out
    abstract: bool = False  # ``path`` names an abstract socket (qemu 6.2+), not a file


@dataclass(frozen=True)
class SerialPort:
    """One ``-device virtserialport``: the name the guest sees and the chardev behind it."""

    name: str
    chardev: str


@dataclass(frozen=True)
class QemuCommandLine:
    """What a qemu command line says about a guest, chardevs in command-line order."""

    name: str | None
    uuid: str | None
    chardevs: tuple[Chardev, ...]
    ports: tuple[SerialPort, ...]

    def chardev(self, chardev_id: str) -> Chardev | None:
        """The chardev with this id, if the command line defines it."""
        return self._by_id.get(chardev_id)

    @cached_property
    def _by_id(self) -> dict[str, Chardev]:
        """Each id's first chardev (qemu refuses a second). A lookup per port must not
        scan them all: whoever runs qemu may write 20,000 of each in its 2 MiB."""
        by_id: dict[str, Chardev] = {}
        for chardev in self.chardevs:
            by_id.setdefault(chardev.id, chardev)
        return by_id


def split_cmdline(raw: bytes) -> list[str]:
    """``/proc/PID/cmdline`` is NUL-separated and NUL-terminated; see ``reading.decode``."""
    return [decode(arg) for arg in raw.split(b"\0")[:-1]]


def parse_keyval(text: str, implied_key: str) -> dict[str, str]:
    """Split qemu's ``a,b=c,d=e,,f`` options; the first bare word is ``implied_key``.

    A later bare word is an old short boolean: ``server`` means ``server=on`` and ``nowait``
    means ``wait=off``.
    """
    result: dict[str, str] = {}
    for index, item in enumerate(_split_commas(text)):
        key, sep, value = item.partition("=")
        if sep:
            result[key] = value
        elif index == 0:
            result[implied_key] = item
        elif item.startswith("no") and len(item) > 2:
            result[item[2:]] = "off"
        else:
            result[item] = "on"
    return result


def _split_commas(text: str) -> list[str]:
    """Split on single commas; ``,,`` stands for a literal comma."""
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "," and text[i + 1 : i + 2] == ",":
            current.append(",")
            i += 2
            continue
        if char == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    items.append("".join(current))
    return items


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).lower() in _TRUE


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # JSON's 1e999 reads as infinity
        return None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: Any) -> dict[str, Any]:
    """A JSON member that should be an object; anything else counts as empty."""
    return value if isinstance(value, dict) else {}


def _json_object(arg: str) -> dict[str, Any] | None:
    """A JSON option's object, or ``None``: not JSON, nested too deep to decode, not an
    object, or holding a string that is not text (a ``\\ud800`` escape decodes to a lone
    surrogate). Whoever runs qemu writes these, and qemu checks ``-device`` only after it
    has created the VM, so discovery reads options qemu will refuse."""
    try:
        obj = json.loads(arg)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not is_text(json.dumps(obj, ensure_ascii=False)):
        return None
    return obj


def parse_chardev(arg: str) -> Chardev | None:
    """One ``-chardev`` argument, keyval or JSON; ``None`` when it has no id."""
    if arg.lstrip().startswith("{"):
        return _chardev_from_json(arg)
    opts = parse_keyval(arg, "backend")
    if "id" not in opts or "backend" not in opts:
        return None
    return Chardev(
        id=opts["id"],
        backend=opts["backend"],
        path=opts.get("path"),
        fd=_int_or_none(opts.get("fd")),
        server=_bool(opts.get("server", "off")),
        abstract=_bool(opts.get("abstract", "off")),
    )


def _chardev_from_json(arg: str) -> Chardev | None:
    """The QMP ``chardev-add`` shape: ``{"id":..,"backend":{"type":..,"data":{..}}}``.

    A flat variant (``{"id":..,"backend":"socket","path":..}``) is accepted as well.
    """
    obj = _json_object(arg)
    if obj is None or not isinstance(obj.get("id"), str):
        return None
    backend = obj.get("backend")
    if isinstance(backend, str):
        return Chardev(
            id=obj["id"],
            backend=backend,
            path=_str_or_none(obj.get("path")),
            fd=_int_or_none(obj.get("fd")),
            server=_bool(obj.get("server", False)),
            abstract=_bool(obj.get("abstract", False)),
        )
    if not isinstance(backend, dict) or not isinstance(backend.get("type"), str):
        return None
    data = _dict(backend.get("data"))
    addr = _dict(data.get("addr"))
    addr_data = _dict(addr.get("data"))
    path = _str_or_none(addr_data.get("path")) if addr.get("type") == "unix" else None
    fd = _int_or_none(addr_data.get("str")) if addr.get("type") == "fd" else None
    return Chardev(
        id=obj["id"],
        backend=backend["type"],
        path=path,
        fd=fd,
        server=_bool(data.get("server", False)),
        abstract=_bool(addr_data.get("abstract", False)),
    )


def parse_device(arg: str) -> SerialPort | None:
    """One ``-device`` argument; a ``SerialPort`` only for a named virtio-serial port."""
    if arg.lstrip().startswith("{"):
        opts = _json_object(arg)
        if opts is None:
            return None
    else:
        opts = parse_keyval(arg, "driver")
    driver, name, chardev = opts.get("driver"), opts.get("name"), opts.get("chardev")
    if not isinstance(driver, str) or driver not in PORT_DRIVERS:
        return None
    if not isinstance(name, str) or not isinstance(chardev, str):
        return None
    return SerialPort(name=name, chardev=chardev)


def parse_cmdline(argv: list[str]) -> QemuCommandLine:
    """Everything discovery needs from a qemu argument vector."""
    name: str | None = None
    uuid: str | None = None
    chardevs: list[Chardev] = []
    ports: list[SerialPort] = []
    i = 1
    while i < len(argv):
        option = argv[i]
        if option.startswith("--"):
            option = option[1:]
        value = argv[i + 1] if i + 1 < len(argv) else None
        if value is None or not option.startswith("-"):
            i += 1
            continue
        if option == "-name":
            name = parse_keyval(value, "guest").get("guest") or name
        elif option == "-uuid":
            uuid = value.lower()
        elif option == "-chardev":
            chardev = parse_chardev(value)
            if chardev is not None:
                chardevs.append(chardev)
        elif option == "-device":
            port = parse_device(value)
            if port is not None:
                ports.append(port)
        else:
            # Options without a value (-S, -no-user-config) would eat the next option.
            i += 1
            continue
        i += 2
    return QemuCommandLine(name=name, uuid=uuid, chardevs=tuple(chardevs), ports=tuple(ports))
