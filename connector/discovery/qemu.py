"""Read a qemu command line: the guest's name and UUID, its chardevs and virtio-serial ports.

Pure functions over the argument vector (``/proc/PID/cmdline`` split on NUL), so every
spelling qemu accepts can be tested without a qemu: keyval (``socket,id=c0,path=P,server=on``,
with ``,,`` for a literal comma), the old short booleans (``server``, ``nowait``), and the
JSON form (``-device '{"driver":"virtserialport",...}'``) that current libvirt uses.

Options may also come from files (``-readconfig FILE``, and qemu's default config unless
``-no-user-config``) and be changed by ``-set group.id.key=value``: the files are read
through a function the caller gives, so that what may be read, and from where, is decided
outside this module."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from connector.discovery.qemuconfig import ConfigSyntaxError, parse_config
from connector.discovery.reading import decode, is_text

# qemu's boolean spellings (qapi_bool_parse).
_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})
# -device drivers that are virtio-serial ports with a ``name`` the guest sees.
PORT_DRIVERS = frozenset({"virtserialport", "virtconsole"})
# The options read here that take a value. Any other option is taken for one without: its
# value, if it has one, is then looked at as an option and passed over as unknown.
_VALUED = frozenset(
    {"-name", "-uuid", "-chardev", "-device", "-readconfig", "-set", "-chroot", "-run-with"}
)
# qemu's -set (qemu_set_option): sscanf "%63[^.].%63[^.].%63[^=]%n", then "=" and the value,
# all of the rest (commas included). An id cannot hold a dot.
_SET = re.compile(r"([^.]{1,63})\.([^.]{1,63})\.([^=]{1,63})=", re.DOTALL)


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
    problems: tuple[str, ...] = ()  # config files that could not be read, and why

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
    return _chardev_from_options(parse_keyval(arg, "backend"))


def _chardev_from_options(opts: dict[str, str]) -> Chardev | None:
    """A chardev from keyval options or a config file's ``[chardev "id"]`` section."""
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
        return None if opts is None else _port_from_options(opts)
    return _port_from_options(parse_keyval(arg, "driver"))


def _port_from_options(opts: dict[str, Any]) -> SerialPort | None:
    """A named virtio-serial port from a device's options, of whatever form; the JSON form's
    values may be of any type."""
    driver, name, chardev = opts.get("driver"), opts.get("name"), opts.get("chardev")
    if not isinstance(driver, str) or driver not in PORT_DRIVERS:
        return None
    if not isinstance(name, str) or not isinstance(chardev, str):
        return None
    return SerialPort(name=name, chardev=chardev)


class ConfigUnreadable(Exception):
    """A config file the caller's reader could not give; the message says why.

    ``missing`` when there is no such file, which qemu passes over for its default config.
    """

    def __init__(self, why: str, *, missing: bool = False) -> None:
        super().__init__(why)
        self.missing = missing


ReadConfig = Callable[[str], bytes]  # a config file's bytes, by the name qemu was given


def _files_not_read(path: str) -> bytes:
    """The reader of a parse that reads no files: each ``-readconfig`` is a problem."""
    raise ConfigUnreadable("config files are not read here", missing=True)


class _Groups:
    """qemu's option groups as qemu builds them, reading its options in order.

    ``-chardev``, ``-device`` (keyval) and a config file's sections make entries that a
    later ``-set group.id.key=value`` may change, so they are kept as options and turned
    into chardevs and ports at the end. A JSON ``-device`` is not one of them in qemu
    (``-set`` cannot name it), and neither is a JSON ``-chardev`` here. Chardevs keep
    their order, the order qemu creates them in (which pty chardevs depend on).
    """

    def __init__(self, read_config: ReadConfig) -> None:
        self.name: str | None = None
        self.chardevs: list[Chardev | dict[str, str]] = []
        self.ports: list[SerialPort | dict[str, str]] = []
        self.problems: list[str] = []
        self._read_config = read_config
        self._by_id: dict[tuple[str, str], dict[str, str]] = {}  # what -set may name

    def add(self, group: str, opts: dict[str, str]) -> None:
        """One option of ``group`` from the command line or a config file."""
        if group == "name":
            # One entry, merged (qemu's "name" group has merge_lists): a later guest wins.
            self.name = opts.get("guest") or self.name
            return
        if group == "chardev":
            self.chardevs.append(opts)
        elif group == "device":
            self.ports.append(opts)
        else:
            return
        if "id" in opts:
            self._by_id.setdefault((group, opts["id"]), opts)  # qemu refuses a second

    def add_json(self, item: Chardev | SerialPort | None) -> None:
        if isinstance(item, Chardev):
            self.chardevs.append(item)
        elif isinstance(item, SerialPort):
            self.ports.append(item)

    def set(self, assignment: str) -> None:
        """``-set group.id.key=value``. qemu stops with an error when the entry is not
        defined by then, so one that names nothing is passed over. An entry's id stays
        what it was defined with (qemu's lookup key)."""
        match = _SET.match(assignment)
        if match is None:
            return
        opts = self._by_id.get((match[1], match[2]))
        if opts is not None and match[3] != "id":
            opts[match[3]] = assignment[match.end() :]

    def read(self, path: str, label: str, *, missing_ok: bool = False) -> None:
        """A config file's sections, in place; a file that cannot be read or parsed adds
        nothing and is a problem (qemu stops at either, so the file changed since)."""
        try:
            sections = parse_config(self._read_config(path))
        except ConfigUnreadable as exc:
            if not (exc.missing and missing_ok):
                self.problems.append(
                    f"{label}: {exc}; the chardevs and devices it gives are not seen"
                )
            return
        except ConfigSyntaxError as exc:
            self.problems.append(
                f"{label}: {exc}, which qemu would have refused: the file changed since qemu "
                "read it; the chardevs and devices it gives are not seen"
            )
            return
        for section in sections:
            self.add(section.group, section.options)

    def command_line(self, uuid: str | None) -> QemuCommandLine:
        chardevs = (_chardev_from_options(c) if isinstance(c, dict) else c for c in self.chardevs)
        ports = (_port_from_options(p) if isinstance(p, dict) else p for p in self.ports)
        return QemuCommandLine(
            name=self.name,
            uuid=uuid,
            chardevs=tuple(c for c in chardevs if c is not None),
            ports=tuple(p for p in ports if p is not None),
            problems=tuple(self.problems),
        )


def _options(argv: list[str]) -> Iterator[tuple[str, str | None]]:
    """Each option with its value (``None`` for one taken to have none); ``--x`` is ``-x``."""
    i = 1
    while i < len(argv):
        option = argv[i]
        if option.startswith("--"):
            option = option[1:]
        if option in _VALUED and i + 1 < len(argv):
            yield option, argv[i + 1]
            i += 2
        else:
            yield option, None
            i += 1


def parse_cmdline(
    argv: list[str], read_config: ReadConfig = _files_not_read, default_config: str | None = None
) -> QemuCommandLine:
    """Everything discovery needs from a qemu argument vector, with the config files it
    names read through ``read_config``: ``default_config`` first (qemu's own, which it
    reads unless ``-no-user-config``, and passes over when missing), then each
    ``-readconfig`` where it stands among the options."""
    groups = _Groups(read_config)
    uuid: str | None = None
    options = list(_options(argv))
    if default_config and ("-no-user-config", None) not in options:
        groups.read(default_config, f"qemu's default config {default_config}", missing_ok=True)
    for option, value in options:
        if value is None:
            continue
        if option == "-name":
            groups.add("name", parse_keyval(value, "guest"))
        elif option == "-uuid":
            uuid = value.lower()
        elif option in ("-chardev", "-device"):
            _add_option(groups, option, value)
        elif option == "-readconfig":
            groups.read(value, f"-readconfig {value}")
        elif option == "-set":
            groups.set(value)
    return groups.command_line(uuid)


def _add_option(groups: _Groups, option: str, value: str) -> None:
    """A ``-chardev`` or ``-device``: JSON as it is, keyval as options ``-set`` may change."""
    if value.lstrip().startswith("{"):
        parse = _chardev_from_json if option == "-chardev" else parse_device
        groups.add_json(parse(value))
    else:
        implied = "backend" if option == "-chardev" else "driver"
        groups.add(option[1:], parse_keyval(value, implied))


def working_dir_moves(argv: list[str]) -> frozenset[str]:
    """The options that take qemu out of the directory it started in, which its relative
    paths name: ``-daemonize`` (to ``/``), ``-chroot DIR`` and ``-run-with chroot=DIR``
    (to DIR's root), each after qemu has opened its chardevs and read its files."""
    moves: set[str] = set()
    for option, value in _options(argv):
        if option in ("-daemonize", "-chroot") or (
            option == "-run-with" and value is not None and "chroot" in parse_keyval(value, "")
        ):
            moves.add(option)
    return frozenset(moves)
