"""The daemon's control socket: answers `qpid-virtio-status` from the daemon's snapshot.

An asyncio unix stream server on the daemon's own loop. Each client sends newline-delimited
JSON requests and gets one JSON line back per request. Nothing a client sends can raise out
of here: a malformed request (too long, too deeply nested, not JSON at all) gets an error
reply and the connection goes on, and only a broken or silent client is dropped, because
the daemon routing a hundred guests must not die for an inspection tool.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
import stat

from connector.control.capacity import ConnectionCap
from connector.control.protocol import (
    MAX_REQUEST_BYTES,
    StateSource,
    answer,
    error_reply,
    socket_error_text,
    socket_path_problem,
)
from connector.errors import ConfigError

log = logging.getLogger("connector.control")

# A client that has not sent a full request line in this long is dropped, so that a stuck
# `socat` left open in a terminal does not hold a server task forever.
REQUEST_IDLE_TIMEOUT = 300.0

# Clients connected at once. qpid-virtio-status holds a connection for one request; a few
# operators watching and a monitoring script's checks need a handful, a burst of parallel
# scripts a few dozen. Each held client is a descriptor the guests' channels need too, and
# a silent one is held for REQUEST_IDLE_TIMEOUT, so a client over this gets an error reply
# and is closed at once.
MAX_CLIENTS = 64


class ControlServer:
    """Serves the control protocol on a unix socket at ``path``.

    ``mode`` and ``group`` decide who may run `qpid-virtio-status`: 0600 keeps it to the
    daemon's user; 0660 with a group lets that group's members in.
    """

    def __init__(
        self, path: str, source: StateSource, mode: int = 0o600, group: str | None = None
    ) -> None:
        self.path = path
        self.source = source
        self.mode = mode
        self.group = group
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._cap = ConnectionCap(MAX_CLIENTS, f"control socket {path}", log)
        # (st_dev, st_ino) of the socket file we bound: close() removes that file only,
        # never one another daemon bound at the same path after ours was removed.
        self._bound: tuple[int, int] | None = None

    async def start(self) -> None:
        """Bind the socket (replacing a stale one), set its mode and group, and listen.

        Raises ConfigError naming the path or group when that is the operator's mistake.
        """
        problem = socket_path_problem(self.path)
        if problem is not None:
            raise ConfigError(self.path, f"cannot listen on control socket: {problem}")
        gid = self._group_id()
        # The default path is under /run, which is empty after boot unless systemd's
        # RuntimeDirectory= made it; a daemon started by hand makes it itself.
        parent = os.path.dirname(self.path)
        if parent and not os.path.isdir(parent):
            try:
                os.makedirs(parent, exist_ok=True)
                os.chmod(parent, 0o755)  # searchable, so a socket group can reach the socket
            except OSError as exc:
                raise ConfigError(
                    self.path, f"cannot create its directory: {exc.strerror}"
                ) from exc
        self._remove_stale_socket()
        # Bind under a umask that already excludes everyone else, so the socket is never
        # reachable with looser permissions than asked, even for the instant before chmod.
        old_umask = os.umask(0o777 & ~self.mode)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve_client, path=self.path, limit=MAX_REQUEST_BYTES
            )
        except OSError as exc:
            raise ConfigError(
                self.path, f"cannot listen on control socket: {socket_error_text(self.path, exc)}"
            ) from exc
        finally:
            os.umask(old_umask)
        st = os.lstat(self.path)
        self._bound = (st.st_dev, st.st_ino)
        os.chmod(self.path, self.mode)
        if gid is not None:
            os.chown(self.path, -1, gid)
        log.info("control socket listening on %s (mode %04o)", self.path, self.mode)

    async def close(self) -> None:
        """Stop listening, drop connected clients, and remove the socket file we bound.

        Waits for the dropped clients' tasks to finish, so none is left pending (and later
        finished against a closed loop) when the loop stops. A file at the path that is not
        the one we bound (ours was removed, and a newer daemon bound its own there) is left
        alone: removing it would cut that daemon off from qpid-virtio-status.
        """
        if self._server is not None:
            self._server.close()
            self._server = None
        clients = list(self._clients)
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        bound, self._bound = self._bound, None
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == bound:
                os.unlink(self.path)

    def _group_id(self) -> int | None:
        if self.group is None:
            return None
        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise ConfigError("control.group", f"no such group {self.group!r}") from None

    def _remove_stale_socket(self) -> None:
        """Unlink a socket left by a daemon that died; refuse to take over a live one."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(self.path, "control socket path exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.path)
            return
        finally:
            probe.close()
        raise ConfigError(self.path, "another connector is already serving this control socket")

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._server is None:
            # Accepted just before close() but first run after it: close() could not cancel
            # this task, and a loop stopping now would leave it pending for good.
            writer.close()
            return
        if not self._cap.admit():
            # Said before the client's request is read, so it is the reply the client reads.
            busy = f"too many control clients connected at once ({MAX_CLIENTS}); try again"
            writer.write(self._encode(error_reply(busy)))
            writer.close()
            return
        self._clients.add(task)
        try:
            await self._conversation(reader, writer)
        except (TimeoutError, ConnectionError):
            pass  # the client went away or fell silent; nothing to tell anyone
        except asyncio.CancelledError:
            # close() ends a connected client's task this way. Ending quietly keeps Python
            # 3.11's stream callback (task.exception() on a cancelled task) from logging a
            # traceback each time the daemon stops under a `qpid-virtio-status --watch`.
            pass
        except Exception:
            log.exception("control client failed")
        finally:
            self._clients.discard(task)
            self._cap.release()
            writer.close()

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), REQUEST_IDLE_TIMEOUT)
            except asyncio.IncompleteReadError as exc:
                line = exc.partial  # the stream ended: a last request without its newline
                if not line:
                    return
            except asyncio.LimitOverrunError as exc:
                # A line over MAX_REQUEST_BYTES is one bad request like any other: it is
                # answered, the rest of it is read and thrown away, and the next line is
                # the next request. Only the stream ending or falling silent ends this.
                await self._send(
                    writer, error_reply(f"request too long (over {MAX_REQUEST_BYTES} bytes)")
                )
                await asyncio.wait_for(self._skip_line(reader, exc), REQUEST_IDLE_TIMEOUT)
                continue
            if not line.strip():
                continue
            await self._send(writer, self.reply_to(line))

    @staticmethod
    async def _skip_line(reader: asyncio.StreamReader, overrun: asyncio.LimitOverrunError) -> None:
        """Throw away the rest of an overlong line, through its newline, a buffer at a time.

        ``readuntil`` leaves the overlong data buffered and says how much of it to consume
        (up to the newline when it has arrived), so memory stays bounded by the limit however
        long the line is. Returns at the end of the stream too: the next read sees it.
        """
        while True:
            await reader.readexactly(overrun.consumed)
            try:
                await reader.readuntil(b"\n")
                return
            except asyncio.IncompleteReadError:
                return
            except asyncio.LimitOverrunError as again:
                overrun = again

    def reply_to(self, line: bytes) -> dict[str, object]:
        """The reply to one raw request line; never raises."""
        try:
            request = json.loads(line)
        except ValueError as exc:
            return error_reply(f"malformed request: {exc}")
        except RecursionError:  # json's decoder recurses once per nested [ or {
            return error_reply("malformed request: nested too deeply")
        try:
            return answer(request, self.source.snapshot())
        except Exception as exc:
            log.exception("control request %r failed", request)
            return error_reply(f"internal error: {exc}")

    @classmethod
    async def _send(cls, writer: asyncio.StreamWriter, reply: dict[str, object]) -> None:
        writer.write(cls._encode(reply))
        await writer.drain()

    @staticmethod
    def _encode(reply: dict[str, object]) -> bytes:
        """One reply as its wire line."""
        return json.dumps(reply, separators=(",", ":")).encode() + b"\n"
