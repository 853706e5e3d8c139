"""qemu command lines, in every spelling discovery must read: keyval, old booleans, JSON,
and the options qemu reads from -readconfig files or changes with -set."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.discovery.qemu import (
    Chardev,
    ConfigUnreadable,
    ReadConfig,
    SerialPort,
    parse_chardev,
    parse_cmdline,
    parse_device,
    parse_keyval,
    split_cmdline,
    working_dir_moves,
)
from connector.discovery.qemuconfig import (
    QEMU_LINE_BYTES,
    ConfigSection,
    ConfigSyntaxError,
    parse_config,
)

# What current libvirt (JSON -device, fd-passed sockets) starts qemu with, abridged.
LIBVIRT_ARGV = [
    "/usr/bin/qemu-system-x86_64",
    "-name",
    "guest=web1,debug-threads=on",
    "-S",
    "-object",
    '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain-3-web1/master-key.aes"}',
    "-machine",
    "pc-q35-7.2,usb=off,dump-guest-core=off",
    "-accel",
    "kvm",
    "-uuid",
    "6A0E3C8E-1A53-4C4B-9B8C-3D1B5B4E2F10",
    "-no-user-config",
    "-nodefaults",
    "-chardev",
    "pty,id=charserial0",
    "-device",
    '{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}',
    "-chardev",
    "socket,id=charchannel0,fd=33,server=on,wait=off",
    "-device",
    '{"driver":"virtserialport","bus":"virtio-serial0.0","nr":1,"chardev":"charchannel0","id":"channel0","name":"org.qpid.amqp.0"}',
    "-chardev",
    "pty,id=charchannel1",
    "-device",
    '{"driver":"virtserialport","bus":"virtio-serial0.0","nr":2,"chardev":"charchannel1","id":"channel1","name":"org.qpid.amqp.1"}',
    "-chardev",
    "spicevmc,id=charchannel2,name=vdagent",
    "-device",
    '{"driver":"virtserialport","bus":"virtio-serial0.0","nr":3,"chardev":"charchannel2","id":"channel2","name":"com.redhat.spice.0"}',
    "-msg",
    "timestamp=on",
]


def test_libvirt_command_line() -> None:
    cmd = parse_cmdline(LIBVIRT_ARGV)
    assert cmd.name == "web1"
    assert cmd.uuid == "6a0e3c8e-1a53-4c4b-9b8c-3d1b5b4e2f10"
    assert cmd.chardevs == (
        Chardev("charserial0", "pty"),
        Chardev("charchannel0", "socket", fd=33, server=True),
        Chardev("charchannel1", "pty"),
        Chardev("charchannel2", "spicevmc"),
    )
    assert cmd.ports == (
        SerialPort("org.qpid.amqp.0", "charchannel0"),
        SerialPort("org.qpid.amqp.1", "charchannel1"),
        SerialPort("com.redhat.spice.0", "charchannel2"),
    )
    assert cmd.chardev("charchannel1") == Chardev("charchannel1", "pty")
    assert cmd.chardev("nope") is None


def test_hand_written_command_line_with_old_spellings() -> None:
    argv = [
        "qemu-system-x86_64",
        "-S",
        "--name",
        "vm2",
        "-chardev",
        "socket,id=a,path=/run/q/a.sock,server,nowait",
        "-chardev",
        "socket,id=b,path=/run/q/b.sock,reconnect=1",
        "-chardev",
        "socket,path=/run/q/c.sock,id=c,server=off",
        "-device",
        "virtio-serial-pci",
        "-device",
        "virtserialport,chardev=a,name=org.qpid.amqp.0",
        "--device",
        "virtserialport,name=org.qpid.amqp.1,chardev=b",
        "-device",
        "virtconsole,chardev=c,name=org.qpid.amqp.2",
    ]
    cmd = parse_cmdline(argv)
    assert cmd.name == "vm2"
    assert cmd.uuid is None
    assert [(c.id, c.path, c.server) for c in cmd.chardevs] == [
        ("a", "/run/q/a.sock", True),
        ("b", "/run/q/b.sock", False),
        ("c", "/run/q/c.sock", False),
    ]
    assert [p.name for p in cmd.ports] == ["org.qpid.amqp.0", "org.qpid.amqp.1", "org.qpid.amqp.2"]


def test_name_forms() -> None:
    assert parse_cmdline(["q", "-name", "plain"]).name == "plain"
    assert parse_cmdline(["q", "-name", "plain,process=qemu:plain"]).name == "plain"
    assert parse_cmdline(["q", "-name", "guest=a,,b,debug-threads=on"]).name == "a,b"
    assert parse_cmdline(["q", "-name"]).name is None


def test_keyval_escapes_and_booleans() -> None:
    assert parse_keyval("socket,id=x,path=/a,,b,server,nowait", "backend") == {
        "backend": "socket",
        "id": "x",
        "path": "/a,b",
        "server": "on",
        "wait": "off",
    }
    expected = Chardev("x", "socket", "/p", None, True)
    assert parse_chardev("socket,id=x,path=/p,server=yes") == expected
    assert parse_chardev("socket,path=/p") is None  # no id: nothing can refer to it


def test_json_chardev_qmp_shape() -> None:
    arg = json.dumps(
        {
            "id": "charchannel0",
            "backend": {
                "type": "socket",
                "data": {
                    "addr": {"type": "unix", "data": {"path": "/var/lib/x/org.qpid.amqp.0"}},
                    "server": True,
                    "wait": False,
                },
            },
        }
    )
    assert parse_chardev(arg) == Chardev(
        "charchannel0", "socket", path="/var/lib/x/org.qpid.amqp.0", server=True
    )
    fd_addr = {"addr": {"type": "fd", "data": {"str": "29"}}}
    fd_arg = json.dumps({"id": "c", "backend": {"type": "socket", "data": fd_addr}})
    assert parse_chardev(fd_arg) == Chardev("c", "socket", fd=29, server=False)
    assert parse_chardev('{"id":"p","backend":{"type":"pty","data":{}}}') == Chardev("p", "pty")
    assert parse_chardev('{"id":"f","backend":"socket","path":"/s","server":true}') == Chardev(
        "f", "socket", path="/s", server=True
    )
    assert parse_chardev("{not json") is None


def test_devices_that_are_not_named_ports() -> None:
    assert parse_device("virtio-serial-pci,id=vs0") is None
    assert parse_device('{"driver":"isa-serial","chardev":"c"}') is None
    assert parse_device("virtserialport,chardev=c") is None  # unnamed port
    assert parse_device("virtserialport,name=x") is None  # no chardev
    assert parse_device("[1,2]") is None


def test_split_cmdline() -> None:
    assert split_cmdline(b"qemu\0-name\0vm\0") == ["qemu", "-name", "vm"]
    assert split_cmdline(b"") == []


def test_bytes_that_are_not_utf8_read_as_escapes_never_as_surrogates() -> None:
    """A name in latin-1 (``caf\\xe9``) must come out as text that encodes as UTF-8."""
    argv = split_cmdline("qemu\0-name\0guest=café,debug-threads=on\0".encode() + b"caf\xe9\0")
    assert argv[2:] == ["guest=café,debug-threads=on", "caf\\xe9"]
    assert parse_cmdline(["qemu", "-name", argv[3]]).name == "caf\\xe9"


def test_json_escapes_to_lone_surrogates_are_refused() -> None:
    """JSON's ``\\udXXX`` escapes can spell a lone surrogate in plain ASCII."""
    port = '{"driver":"virtserialport","chardev":"c0","name":"org.qpid.amqp.\\udce9"}'
    chardev = '{"id":"c0","backend":"socket","path":"/run/\\ud800.sock","server":true}'
    assert parse_device(port) is None
    assert parse_chardev(chardev) is None
    assert parse_device(port.replace("\\udce9", "\\u00e9")) == SerialPort("org.qpid.amqp.é", "c0")


_IDS = st.text(st.characters(blacklist_characters=",=\0", blacklist_categories=("Cs",)), min_size=1)
_PATHS = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), min_size=1)


@given(path=_PATHS, cid=_IDS)
def test_keyval_path_round_trip(path: str, cid: str) -> None:
    """Any path, written the way qemu wants it (commas doubled), reads back unchanged."""
    arg = f"socket,id={cid},path={path.replace(',', ',,')},server=on"
    chardev = parse_chardev(arg)
    assert chardev == Chardev(cid, "socket", path=path, server=True)


# JSON options whose values have the wrong type or shape: qemu itself may refuse them, but
# only after it has created the VM (it checks -device after the accelerator), so discovery
# reads them. Each stands beside a port that is fine.
_DEEP = "[" * 5000 + "]" * 5000
HOSTILE_JSON = {
    "driver is a list": ("-device", '{"driver":["virtserialport"],"chardev":"c0","name":"p"}'),
    "backend data is a list": ("-chardev", '{"id":"c9","backend":{"type":"socket","data":[1]}}'),
    "addr is a string": ("-chardev", '{"id":"c9","backend":{"type":"socket","data":{"addr":"x"}}}'),
    "fd is infinite": ("-chardev", '{"id":"c9","backend":"socket","fd":1e999}'),
    "nested 5000 deep": ("-device", '{"driver":"virtserialport","x":' + _DEEP + "}"),
    "path is a number": ("-chardev", '{"id":"c9","backend":"socket","path":5,"server":true}'),
}


@pytest.mark.parametrize("option", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_json_options_of_the_wrong_shape_are_ignored(option: tuple[str, str]) -> None:
    argv = [
        "qemu",
        *option,
        "-chardev",
        "socket,id=c0,path=/run/q/a.sock,server=on",
        "-device",
        "virtserialport,chardev=c0,name=org.qpid.amqp.0",
    ]
    cmd = parse_cmdline(argv)
    assert cmd.ports[-1] == SerialPort("org.qpid.amqp.0", "c0")
    assert all(isinstance(c.path, str | None) for c in cmd.chardevs)
    assert cmd.chardev("c0") == Chardev("c0", "socket", path="/run/q/a.sock", server=True)


# -- -readconfig files, -set ------------------------------------------------------------

# In the style of qemu's docs/config/*.cfg, with a virtio-serial port and its chardev.
CONFIG = b"""# q35 - a guest with an AMQP channel
# ===================================

[name]
  guest = "cfg-vm"

[chardev "ch0"]
  backend = "socket"
  path = "/run/vm/amqp.sock"                  # CHANGE ME
  server = "on"
  wait = "off"

[device "vs"]
  driver = "virtio-serial-pci"

[device "p0"]
  driver = "virtserialport"
  chardev = "ch0"
  name = "org.qpid.amqp.0"
"""


def test_config_file_sections() -> None:
    assert parse_config(CONFIG) == [
        ConfigSection("name", {"guest": "cfg-vm"}),
        ConfigSection(
            "chardev",
            {
                "id": "ch0",
                "backend": "socket",
                "path": "/run/vm/amqp.sock",
                "server": "on",
                "wait": "off",
            },
        ),
        ConfigSection("device", {"id": "vs", "driver": "virtio-serial-pci"}),
        ConfigSection(
            "device",
            {"id": "p0", "driver": "virtserialport", "chardev": "ch0", "name": "org.qpid.amqp.0"},
        ),
    ]


@pytest.mark.parametrize(
    ("line", "options"),
    [
        (b'  path = "a b"\n', {"path": "a b"}),  # blanks inside the quotes are the value's
        (b"path\n", {"path": ""}),  # a key alone sets it empty, as sscanf lets it
        (b"path = /a.sock\n", {"path": ""}),  # so does a value without quotes
        (b'path = "/a.sock\n', {"path": "/a.sock\n"}),  # an unclosed quote runs to the end
        (b'path="/a"\n', {'path="/a"': ""}),  # %63s takes all to the blank for the key
        (b'  #path = "/a"\n', {"#path": "/a"}),  # '#' comments only at the line's start
        (b'id = "other"\n', {"id": "other"}),  # replaces the header's id, as in qemu
        (b'path = "/a\0b"\n', {"path": "/a"}),  # sscanf stops at a NUL
        (b'name = "caf\xe9"\n', {"name": "caf\\xe9"}),  # a byte that is not UTF-8
        (b'%s = "v"\n' % (b"k" * 70), {"k" * 63: ""}),  # a key is cut at 63 bytes
    ],
)
def test_config_lines_read_as_qemus_sscanf_reads_them(line: bytes, options: dict[str, str]) -> None:
    (section,) = parse_config(b'[chardev "c"]\n' + line)
    assert section.options == {"id": "c", **options}


@pytest.mark.parametrize(
    ("header", "group", "options"),
    [
        (b'[chardev "c0"]', "chardev", {"id": "c0"}),
        (b'[ chardev   "c0"  ]', "chardev", {"id": "c0"}),
        (b'[chardev "c0', "chardev", {"id": "c0\n"}),  # %63[^"] takes the newline
        (b'[chardev"c0"]', 'chardev"c0"', {}),  # %63s takes the quotes: no id, another group
        (b"[name]", "name", {}),
        (b"[name", "name\n", {}),
        (b'[chardev "%s"]' % (b"x" * 70), "chardev", {"id": "x" * 63}),
    ],
)
def test_config_headers(header: bytes, group: str, options: dict[str, str]) -> None:
    (section,) = parse_config(header + b"\n")
    assert (section.group, section.options) == (group, options)


def test_a_config_line_longer_than_qemus_buffer_is_read_in_pieces() -> None:
    """fgets into 1024 bytes: the rest of a longer line is a line of its own."""
    value = b"/" + b"p" * 1100
    (section,) = parse_config(b'[chardev "c"]\npath = "' + value + b'"\n')
    first = (b'path = "' + value)[:QEMU_LINE_BYTES].decode()
    assert section.options == {"id": "c", "path": first[len('path = "') :], "p" * 63: ""}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (b'path = "/a"\n', "line 1: no group defined"),
        (b'[chardev "c"]\n  \n', "line 2: parse error"),  # blanks only: no key
        (b'[chardev "c"]\n\0\n', "line 2: parse error"),
    ],
)
def test_config_lines_qemu_refuses(text: bytes, error: str) -> None:
    with pytest.raises(ConfigSyntaxError, match=error):
        parse_config(text)


def test_empty_lines_and_comments() -> None:
    assert parse_config(b"") == []
    assert parse_config(b'\n# [chardev "c"]\n\n') == []


def _reader(files: dict[str, bytes]) -> ReadConfig:
    """A config reader over a dict: a name not in it is missing."""

    def read(path: str) -> bytes:
        if path not in files:
            raise ConfigUnreadable("No such file or directory", missing=True)
        return files[path]

    return read


PORT = "org.qpid.amqp.0"
PTY_CONFIG = b"""[chardev "cfg-pty"]
  backend = "pty"
[device "cfg-port"]
  driver = "virtserialport"
  chardev = "cfg-pty"
  name = "org.qpid.amqp.1"
"""


def test_readconfig_sections_stand_where_the_option_does() -> None:
    """qemu creates chardevs in the order it read them, -readconfig's among the rest: the
    n-th pty chardev gets the n-th pty."""
    argv = [
        "qemu",
        "-chardev", "pty,id=first",
        "-readconfig", "vm.cfg",
        "-chardev", "pty,id=last",
        "-device", "virtserialport,chardev=last,name=org.qpid.amqp.2",
    ]  # fmt: skip
    cmd = parse_cmdline(argv, _reader({"vm.cfg": PTY_CONFIG}))
    assert [c.id for c in cmd.chardevs] == ["first", "cfg-pty", "last"]
    assert cmd.ports == (
        SerialPort("org.qpid.amqp.1", "cfg-pty"),
        SerialPort("org.qpid.amqp.2", "last"),
    )
    assert cmd.problems == ()


def test_name_from_a_config_file_and_the_command_line() -> None:
    """qemu merges its one "name" entry: the last guest given wins; -uuid has no group."""
    files = _reader({"a.cfg": b'[name]\nguest = "from-file"\n', "b.cfg": b"[name]\n"})
    assert parse_cmdline(["q", "-readconfig", "a.cfg"], files).name == "from-file"
    assert parse_cmdline(["q", "-name", "cli", "-readconfig", "a.cfg"], files).name == "from-file"
    assert parse_cmdline(["q", "-readconfig", "a.cfg", "-name", "cli"], files).name == "cli"
    assert parse_cmdline(["q", "-readconfig", "a.cfg", "-readconfig", "b.cfg"], files).name == (
        "from-file"
    )


def test_set_changes_an_entry_defined_before_it() -> None:
    argv = [
        "qemu",
        "-readconfig", "vm.cfg",
        "-set", "chardev.ch0.path=/run/x,y.sock",  # the value is all of the rest
        "-set", "device.p0.name=org.qpid.amqp.7",
        "-chardev", "socket,id=c1,path=/run/a.sock,server=on",
        "--set", "chardev.c1.server=off",
        "-device", "virtserialport,id=d1,chardev=c1,name=org.qpid.amqp.1",
        "-set", "device.d1.chardev=ch0",
    ]  # fmt: skip
    cmd = parse_cmdline(argv, _reader({"vm.cfg": CONFIG}))
    assert cmd.name == "cfg-vm"
    assert cmd.chardevs == (
        Chardev("ch0", "socket", path="/run/x,y.sock", server=True),
        Chardev("c1", "socket", path="/run/a.sock", server=False),
    )
    assert cmd.ports == (
        SerialPort("org.qpid.amqp.7", "ch0"),
        SerialPort("org.qpid.amqp.1", "ch0"),
    )


LONG_ID = "c" * 64


@pytest.mark.parametrize(
    "assignment",
    [
        "chardev.c1.path=/elsewhere",  # c1 comes later: qemu stops with an error
        "chardev.missing.path=/elsewhere",
        "device.json.name=org.qpid.amqp.9",  # a JSON -device is no entry -set can name
        "chardev.c0.id=c1",  # the id qemu looks it up by stays
        "chardev.c0path=/elsewhere",  # not group.id.key=value
        "chardev.c0.path",
        f"chardev.{LONG_ID}.path=/elsewhere",  # %63[^.] stops short of the dot: no -set
    ],
)
def test_set_that_names_no_entry_changes_nothing(assignment: str) -> None:
    argv = [
        "qemu",
        "-chardev", "socket,id=c0,path=/run/a.sock,server=on",
        "-device", json.dumps({"driver": "virtserialport", "id": "json", "chardev": "c0",
                               "name": PORT}),
        "-chardev", f"socket,id={LONG_ID},path=/run/long.sock,server=on",
        "-set", assignment,
        "-chardev", "socket,id=c1,path=/run/b.sock,server=on",
    ]  # fmt: skip
    cmd = parse_cmdline(argv)
    assert cmd.chardevs == (
        Chardev("c0", "socket", path="/run/a.sock", server=True),
        Chardev(LONG_ID, "socket", path="/run/long.sock", server=True),
        Chardev("c1", "socket", path="/run/b.sock", server=True),
    )
    assert cmd.ports == (SerialPort(PORT, "c0"),)


def test_qemus_default_config_is_read_first_unless_no_user_config() -> None:
    default = b'[chardev "d"]\nbackend = "pty"\n'
    files = _reader({"/etc/qemu/qemu.conf": default})
    argv = ["qemu", "-chardev", "pty,id=c"]
    cmd = parse_cmdline(argv, files, "/etc/qemu/qemu.conf")
    assert [c.id for c in cmd.chardevs] == ["d", "c"]
    no_user = parse_cmdline([*argv, "-no-user-config"], files, "/etc/qemu/qemu.conf")
    assert [c.id for c in no_user.chardevs] == ["c"]
    missing = parse_cmdline(argv, _reader({}), "/etc/qemu/qemu.conf")  # qemu passes it over
    assert ([c.id for c in missing.chardevs], missing.problems) == (["c"], ())


def test_a_config_file_not_read_is_a_problem_and_gives_nothing() -> None:
    def unreadable(path: str) -> bytes:
        raise ConfigUnreadable("Permission denied")

    argv = ["qemu", "-readconfig", "a.cfg", "-readconfig", "gone.cfg", "-readconfig", "bad.cfg"]
    files = {"a.cfg": PTY_CONFIG, "bad.cfg": PTY_CONFIG.replace(b"[chardev", b"  \n[chardev")}
    cmd = parse_cmdline(argv, _reader(files))
    assert [c.id for c in cmd.chardevs] == ["cfg-pty"]
    assert cmd.problems == (
        "-readconfig gone.cfg: No such file or directory; the chardevs and devices it gives "
        "are not seen",
        "-readconfig bad.cfg: line 1: parse error, which qemu would have refused: the file "
        "changed since qemu read it; the chardevs and devices it gives are not seen",
    )
    denied = parse_cmdline(["qemu", "-readconfig", "a.cfg"], unreadable, "/etc/qemu/qemu.conf")
    assert [p.split(";")[0] for p in denied.problems] == [
        "qemu's default config /etc/qemu/qemu.conf: Permission denied",
        "-readconfig a.cfg: Permission denied",
    ]
    assert parse_cmdline(argv).problems[0].startswith("-readconfig a.cfg: config files are not")


@pytest.mark.parametrize(
    ("argv", "moves"),
    [
        (["qemu", "-S", "-name", "vm"], set()),
        (["qemu", "-daemonize"], {"-daemonize"}),
        (["qemu", "--daemonize", "-chroot", "/var/empty"], {"-daemonize", "-chroot"}),
        (["qemu", "-run-with", "chroot=/var/empty,user=qemu"], {"-run-with"}),
        (["qemu", "-run-with", "async-teardown=on"], set()),
        (["qemu", "-name", "-daemonize"], set()),  # a value, not the option
    ],
)
def test_options_that_leave_the_start_directory(argv: list[str], moves: set[str]) -> None:
    assert working_dir_moves(argv) == moves
