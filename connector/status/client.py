"""A blocking control-socket client whose failures read as one clear line for a person.

The three things that go wrong in practice each get their own error: the socket is not
there (connector not running, or another path), permission is denied (name the group to
join), and the connector speaks an older protocol than this tool needs.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import socket
import stat
from typing import Any

from connector.control.protocol import PROTOCOL_VERSION, socket_error_text, socket_path_problem

DEFAULT_CONTROL_SOCKET = "/run/qpid-virtio-connector/control.sock"
CONTROL_SOCKET_ENV = "QPID_VIRTIO_CONTROL"

# How long to wait for the daemon's reply. It answers from memory in milliseconds; a
# daemon that takes this long is wedged, and the operator should hear so, not wait.
REPLY_TIMEOUT = 10.0

# Replies are a snapshot of every channel with its links; a few MiB covers thousands of
# guests while still refusing to read an endless stream from something that is not us.
MAX_REPLY_BYTES = 64 * 1024 * 1024


class ControlError(Exception):
    """The connector could not be asked; the message is the line to print."""


class ConnectorUnreachable(ControlError):
    """No connector answers on the socket (missing, refused, denied, or silent)."""


class ConnectorTooOld(ControlError):
    """The connector answers, but with an older protocol than this tool needs."""


class RequestFailed(ControlError):
    """The connector answered the request with an error (unknown guest, bad request)."""


def default_socket_path() -> str:
    """$QPID_VIRTIO_CONTROL when set, else the daemon's default path."""
    return os.environ.get(CONTROL_SOCKET_ENV) or DEFAULT_CONTROL_SOCKET


def permission_hint(path: str) -> str:
    """Who may use the socket, and what to do about it, from its owner, group and mode."""
    try:
        st = os.stat(path)
    except OSError:
        return _blocking_directory(path)
    owner = _name(pwd.getpwuid, st.st_uid)
    group = _name(grp.getgrgid, st.st_gid)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o060 == 0o060:
        return (
            f"it is owned by {owner}:{group} with mode {mode:04o}: join group {group!r} "
            f"(usermod -aG {group} $USER, then log in again) or run as {owner}"
        )
    return (
        f"it is owned by {owner}:{group} with mode {mode:04o}: run as {owner}, or start the "
        "connector with a control socket group and mode 0660 and join that group"
    )


def _blocking_directory(path: str) -> str:
    """Name the first directory on the way to ``path`` that this user may not search."""
    parts = os.path.abspath(path).split(os.sep)[1:-1]
    for depth in range(len(parts)):
        folder = os.sep + os.sep.join(parts[: depth + 1])
        if not os.access(folder, os.X_OK):
            return f"you may not search its directory {folder}: ask for access to it"
    return "check the permissions of its directory"


def _name(lookup: Any, ident: int) -> str:
    try:
        return str(lookup(ident)[0])
    except KeyError:
        return str(ident)


class ControlClient:
    """Sends requests to the connector's control socket and returns the decoded replies."""

    def __init__(self, path: str | None = None, timeout: float = REPLY_TIMEOUT) -> None:
        self.path = path or default_socket_path()
        self.timeout = timeout

    def request(self, command: str, need_version: int = PROTOCOL_VERSION, **args: Any) -> dict:
        """One request/reply exchange; raises a ControlError subclass with a clear message."""
        reply = self._exchange({"command": command, **args})
        version = reply.get("version")
        if not isinstance(version, int) or version < need_version:
            raise ConnectorTooOld(
                f"the connector at {self.path} speaks control protocol {version}, this "
                f"qpid-virtio-status needs {need_version}: upgrade the connector"
            )
        if not reply.get("ok"):
            raise RequestFailed(str(reply.get("error", "the connector refused the request")))
        return reply

    def _exchange(self, request: dict[str, Any]) -> dict[str, Any]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            self._connect(sock)
            # A connector that turns us away (too many clients) says why and hangs up, maybe
            # before our request is sent: what it said is still there to read.
            with contextlib.suppress(BrokenPipeError):
                sock.sendall(json.dumps(request).encode() + b"\n")
            line = self._read_line(sock)
        except TimeoutError:
            raise ConnectorUnreachable(
                f"the connector at {self.path} did not answer within {self.timeout:g}s"
            ) from None
        except ConnectionError as exc:  # it hung up on a request it had not read
            raise ConnectorUnreachable(
                f"the connector at {self.path} dropped the connection without a reply: "
                f"{exc.strerror or exc}"
            ) from None
        finally:
            sock.close()
        try:
            reply = json.loads(line)
        except ValueError:
            raise ControlError(f"{self.path} answered something that is not JSON") from None
        if not isinstance(reply, dict):
            raise ControlError(f"{self.path} answered something that is not a reply")
        return reply

    def _connect(self, sock: socket.socket) -> None:
        problem = socket_path_problem(self.path)
        if problem is not None:
            raise ConnectorUnreachable(f"cannot connect to control socket {self.path}: {problem}")
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            raise ConnectorUnreachable(
                f"control socket {self.path} does not exist: is qpid-virtio-connector "
                f"running? (set --control-socket or ${CONTROL_SOCKET_ENV} for another path)"
            ) from None
        except PermissionError:
            raise ConnectorUnreachable(
                f"permission denied on control socket {self.path}: {permission_hint(self.path)}"
            ) from None
        except ConnectionRefusedError:
            raise ConnectorUnreachable(
                f"nothing listens on control socket {self.path}: the connector is not running "
                "(the file is left from an earlier run)"
            ) from None
        except OSError as exc:
            raise ConnectorUnreachable(
                f"cannot connect to control socket {self.path}: {socket_error_text(self.path, exc)}"
            ) from None

    def _read_line(self, sock: socket.socket) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                if chunks:
                    break
                # An old connector that predates the command may simply hang up.
                raise ConnectorTooOld(
                    f"the connector at {self.path} closed the connection without a reply: "
                    "it may be older than this qpid-virtio-status"
                )
            chunks.append(chunk)
            size += len(chunk)
            if chunk.endswith(b"\n"):
                break
            if size > MAX_REPLY_BYTES:
                raise ControlError(f"the reply from {self.path} is larger than any real one")
        return b"".join(chunks)
