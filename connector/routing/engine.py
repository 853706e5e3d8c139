"""One side of a routed connection: a proton Transport, Connection and Collector, sans-IO.

An ``Engine`` has no file descriptor. Bytes go in with :meth:`Engine.push`, bytes come out
with :meth:`Engine.peek_output` / :meth:`Engine.pop_output`, and time advances with
:meth:`Engine.tick`. The loop owns the sockets and calls these; the router reads the
collector. That split is what lets the routing core be tested with no sockets at all: two
engines can be pumped into each other in memory.

Everything here uses proton's low-level C functions (``cproton_ffi.lib``) rather than its
Python classes, because the push/pull path runs once per read and write and the Python
wrappers cost several times more per call (see ``docs/performance.md``).
"""

from __future__ import annotations

import cffi
import cproton_ffi
from cproton_ffi import ffi, lib

from .echo import EchoAnswers
from .frames import FrameReader, FrameWriter, LinkExtras, LinkKey

# Proton's input buffer starts at 8 KiB and grows; we read in larger chunks and push them in
# a loop. 64 KiB keeps a 1 KiB-message stream to a handful of syscalls per hundred messages.
IO_CHUNK = 64 * 1024

# Two things proton's engine does but its Python binding does not declare, reached through
# functions the same library exports:
# - Proton's SASL layer rewrites the EXTERNAL identity from the TLS layer when it reads the
#   SASL header, and has no public setter for a non-TLS transport. A virtio channel IS an
#   external identity (the host knows who is on the other end), so we set it right after
#   the header.
# - A close is held back until the peer's open has arrived; only proton's transport-error
#   path writes open and close at once, which a guest that never opens must still be told.
# If a future proton drops either symbol, EXTERNAL is not offered / such a guest is dropped
# without a close.
_ext_ffi = cffi.FFI()
_ext_ffi.cdef(
    "void pni_sasl_set_external_security(void *transport, int ssf, const char *authid);"
    "int pn_do_error(void *transport, const char *condition, const char *fmt, ...);"
)
try:
    _ext_lib = _ext_ffi.dlopen(cproton_ffi.__file__)
except OSError:  # pragma: no cover - depends on the proton build
    _ext_lib = None
_set_external = getattr(_ext_lib, "pni_sasl_set_external_security", None)
_do_error = getattr(_ext_lib, "pn_do_error", None)

SASL_HEADER = b"AMQP\x03\x01\x00\x00"

# Proton frames outgoing message bytes into an internal buffer as fast as the peer's
# session window allows (Artemis's is effectively unlimited), then copies frames into its
# output buffer, which grows only up to the peer's max-frame-size; pn_transport_pending
# reports just the output buffer. So when that buffer is full, any amount may wait behind
# it, unseen: a 60 MB message from a fast guest to a slower broker once piled up there
# whole. A full output buffer therefore reports this backlog, above any limit, and
# backpressure stops feeding the side until the buffer has room again, which bounds what
# hides behind it to one read's worth.
OUTPUT_FULL = 1 << 62
# Proton's output buffer starts at this size (PN_TRANSPORT_INITIAL_BUFFER_SIZE) and only
# grows, so less pending output than this is never a full buffer.
_OUTPUT_INITIAL = 8 * 1024


# Where proton copies pending output for peek_output: one buffer for every engine. The loop
# writes what it peeked before it peeks again (one thread, nothing between a peek and its
# write), so one suffices; a buffer per engine cost 64 KiB per side of every guest, a third
# of a connected guest's memory (bench/scale.py).
_OUT = bytearray(IO_CHUNK)
_OUT_VIEW = memoryview(_OUT)
_OUT_PTR = ffi.from_buffer(_OUT)


class Engine:
    """A proton transport bound to a connection, driven by pushing and pulling bytes."""

    __slots__ = (
        "_echo",
        "_idle_ms",
        "_idle_on_input",
        "_outfull",
        "collector",
        "connection",
        "disposition_storm",
        "is_server",
        "reader",
        "transport",
        "writer",
    )

    def __init__(
        self,
        *,
        server: bool,
        user: str | None = None,
        password: str | None = None,
        hostname: str | None = None,
    ) -> None:
        self.is_server = server
        self.transport = lib.pn_transport()
        if server:
            lib.pn_transport_set_server(self.transport)
        self.connection = lib.pn_connection()
        # Proton's SASL layer takes the credentials and host name when the transport is
        # bound, so they are set first.
        if user:
            lib.pn_connection_set_user(self.connection, user.encode())
        if password:
            lib.pn_connection_set_password(self.connection, password.encode())
        if hostname:
            lib.pn_connection_set_hostname(self.connection, hostname.encode())
        self.collector = lib.pn_collector()
        lib.pn_connection_collect(self.connection, self.collector)
        lib.pn_transport_bind(self.transport, self.connection)
        self._outfull = _OUTPUT_INITIAL  # the most pending output seen: proton's buffer size
        # What proton's engine leaves undone (frames.py): the attach fields it drops, read
        # from the peer's bytes and written into ours, and answers to the peer's flow echo.
        self.reader = FrameReader()
        self.writer = FrameWriter()
        self._echo = EchoAnswers()
        # Our idle timeout while its check is suspended (``input_paused``), else None;
        # and whether the check comes back with the peer's next bytes.
        self._idle_ms: int | None = None
        self._idle_on_input = False
        # Whether a read's dispositions named more delivery-ids than ``reader`` allows
        # (``FrameReader.disposition_limit``): its bytes, and all after it, are not pushed.
        self.disposition_storm = False

    # -- configuration -------------------------------------------------------------------

    def configure_sasl(self, mechs: str, *, allow_insecure: bool = False) -> None:
        """Offer (server) or allow (client) these SASL mechanisms, space separated."""
        sasl = lib.pn_sasl(self.transport)
        lib.pn_sasl_allowed_mechs(sasl, mechs.encode())
        if allow_insecure:
            lib.pn_sasl_set_allow_insecure_mechs(sasl, True)
        if self.is_server:
            # A guest that skips SASL (bare AMQP header) is still accepted: its identity is
            # the channel's, not something it proves.
            lib.pn_transport_require_auth(self.transport, False)

    def set_external_identity(self, authid: str) -> bool:
        """Let SASL EXTERNAL succeed as ``authid``; call after the SASL header is pushed."""
        if _set_external is None:
            return False
        _set_external(self._ext_transport(), 0, authid.encode())
        return True

    def fail(self, condition: str, description: str) -> bool:
        """End the connection now as a transport error: proton writes an open (if none was
        sent) and a close carrying the condition, even before the peer's open."""
        if _do_error is None:
            return False
        _do_error(
            self._ext_transport(),
            condition.encode(),
            b"%s",
            _ext_ffi.new("char[]", description.encode()),
        )
        return True

    def _ext_transport(self) -> object:
        return _ext_ffi.cast("void *", int(ffi.cast("uintptr_t", self.transport)))

    def set_limits(self, *, max_frame: int, channel_max: int, idle_timeout_ms: int) -> None:
        """Advertise our frame size, session count and idle timeout to the peer."""
        lib.pn_transport_set_max_frame(self.transport, max_frame)
        lib.pn_transport_set_channel_max(self.transport, channel_max)
        lib.pn_transport_set_idle_timeout(self.transport, idle_timeout_ms)

    # -- bytes in and out ----------------------------------------------------------------

    def push(self, data: bytes | bytearray | memoryview) -> int:
        """Feed bytes read from the peer; returns how many proton took (all, unless closed).

        Proton accepts at most its current capacity per call, so push in a loop; each call
        also processes the frames it completed.
        """
        total = len(data)
        if not total:
            return 0
        if self._idle_on_input:
            self._restore_idle_check()
        reader = self.reader
        reader.feed(data)
        limit = reader.disposition_limit
        if (limit and reader.disposition_span > limit) or self.disposition_storm:
            # Pushed, it would have proton post an event per delivery named: the caller
            # ends the connection (``Router.process``).
            self.disposition_storm = True
            return 0
        buf = ffi.from_buffer(data)
        done = 0
        while done < total:
            n = lib.pn_transport_push(self.transport, buf + done, total - done)
            if n <= 0:
                break
            done += n
        if reader.flows or reader.flows_skipped:  # an echo asked for, or a link owing one moved
            self._echo.note_peer_flows(self)
        return done

    @property
    def input_closed(self) -> bool:
        """Proton takes no more input: the stream ended, failed, or could not be decoded.

        Proton stops reading at some undecodable input (an unknown performative) without
        setting an error; the caller must then end the connection itself.
        """
        return lib.pn_transport_capacity(self.transport) < 0

    def close_input(self) -> None:
        """The peer's byte stream ended (EOF)."""
        lib.pn_transport_close_tail(self.transport)

    def output_pending(self) -> int:
        """Bytes proton wants written; negative once the output side is closed for good."""
        n = lib.pn_transport_pending(self.transport)
        out = self.writer
        if n < 0 or not (out.staged or out.edits):
            return n
        n += len(out.staged) - out.staged_pos
        return n + sum(len(new) - size for _, size, new in out.edits)

    def peek_output(self) -> memoryview:
        """Up to ``IO_CHUNK`` bytes of pending output, valid until the next call on any
        engine (the buffer is shared): write it, or copy it, before peeking again."""
        out = self.writer
        if out.staged:
            return memoryview(out.staged)[out.staged_pos :]
        if self._echo.due:
            self._echo.answer(self)
        n = lib.pn_transport_pending(self.transport)
        if n < 0:
            return _OUT_VIEW[:0]
        if n:
            n = min(n, IO_CHUNK)
            if lib.pn_transport_peek(self.transport, _OUT_PTR, n) < 0:
                return _OUT_VIEW[:0]
            ok = out.sendable(_OUT_VIEW[:n], self._peek_frame)
            if ok:
                return _OUT_VIEW[:ok]
        edit = out.head_edit()
        if edit is None:
            return _OUT_VIEW[:0]
        # An attach of ours completed with the fields proton drops (it replaces proton's
        # frame), or a frame of ours put in (an echo answer).
        size, new = edit
        if size:
            lib.pn_transport_pop(self.transport, size)
            out.popped(size)
        out.staged = new
        out.staged_pos = 0
        return memoryview(new)

    def _peek_frame(self, size: int) -> bytes | None:
        """``size`` bytes of pending output, more than a peek holds (a large attach)."""
        have = lib.pn_transport_pending(self.transport)
        while 0 < have < size:  # proton grows its output buffer while it is full
            grown = lib.pn_transport_pending(self.transport)
            if grown <= have:
                return None
            have = grown
        buf = ffi.new("char[]", size)
        if lib.pn_transport_peek(self.transport, buf, size) < 0:
            return None
        return ffi.buffer(buf)[:]

    def pop_output(self, n: int) -> None:
        """``n`` bytes of the peeked output were written."""
        out = self.writer
        if out.staged:
            out.staged_pos += n
            if out.staged_pos >= len(out.staged):
                out.staged = b""
            return
        lib.pn_transport_pop(self.transport, n)
        out.popped(n)

    def output_hidden(self, pending: int) -> bool:
        """Whether frames proton produced may sit out of sight behind ``pending`` bytes of
        output: its output buffer is as full as it has ever been (see ``OUTPUT_FULL``)."""
        return pending >= self._outfull

    # -- the attach fields proton drops --------------------------------------------------

    def peer_attach_extras(self, key: LinkKey) -> LinkExtras | None:
        """What the peer's attach for ``key`` said in the fields proton does not decode."""
        return self.reader.take(key)

    def complete_attach(self, key: LinkKey, extras: LinkExtras) -> None:
        """Put ``extras`` into our attach for ``key`` when proton writes it."""
        self.writer.complete(key, extras)

    def backlog(self) -> int:
        """Bytes waiting to go to the peer: framed output plus message bytes that proton
        holds in sessions until the peer's window opens, or ``OUTPUT_FULL`` while proton's
        output buffer is full (more may be hidden behind it). Backpressure watches this."""
        total = lib.pn_transport_pending(self.transport)
        if self.output_hidden(total):
            # The buffer is at the largest size it has had: full, or just grown because it
            # was full. (Equal by chance costs one pause until the next write drains it.)
            self._outfull = total
            return OUTPUT_FULL
        total = max(0, total)
        ssn = lib.pn_session_head(self.connection, 0)
        while ssn != ffi.NULL:
            total += lib.pn_session_outgoing_bytes(ssn)
            ssn = lib.pn_session_next(ssn, 0)
        return total

    # -- idle timeout while the loop does not read the peer ------------------------------

    def input_paused(self) -> None:
        """The loop stopped reading this peer (backpressure: the far side is slow).

        From now on the peer's bytes, heartbeats included, wait unread in the socket, so
        its silence is ours: proton, which takes a peer silent past our idle timeout for
        dead, would cut a live peer. Its check is suspended until the peer is read again;
        our heartbeats to the peer go on (proton checks the two apart).
        """
        if self._idle_ms is None:
            self._idle_ms = lib.pn_transport_get_idle_timeout(self.transport)
            lib.pn_transport_set_idle_timeout(self.transport, 0)
        self._idle_on_input = False

    def input_resumed(self, waiting: bool) -> None:
        """The loop reads this peer again; ``waiting``: bytes of it are ready to read.

        With bytes waiting, the check comes back as they are pushed: proton then counts
        the peer's silence from them. With none, the peer sent nothing while it was not
        read, so proton rightly counts its silence from the last bytes it did read.
        """
        if self._idle_ms is None:
            return
        if waiting:
            self._idle_on_input = True
        else:
            self._restore_idle_check()

    def _restore_idle_check(self) -> None:
        if self._idle_ms is not None:
            lib.pn_transport_set_idle_timeout(self.transport, self._idle_ms)
        self._idle_ms = None
        self._idle_on_input = False

    def tick(self, now_ms: int) -> int:
        """Advance proton's clock (heartbeats, idle timeout); returns the next deadline in ms.

        Zero means no deadline.
        """
        return lib.pn_transport_tick(self.transport, now_ms)

    @property
    def closed(self) -> bool:
        """Both directions of the transport are finished."""
        return bool(lib.pn_transport_closed(self.transport))

    def condition(self) -> tuple[str, str] | None:
        """The transport's error (framing, SASL, idle timeout), if it has one."""
        return read_condition(lib.pn_transport_condition(self.transport))

    def free(self) -> None:
        """Release the proton objects. The engine must not be used afterwards."""
        if self.transport is None:
            return
        # The cffi layer exposes release + decref rather than the *_free shorthands.
        lib.pn_transport_unbind(self.transport)
        lib.pn_decref(self.transport)
        lib.pn_connection_release(self.connection)
        lib.pn_decref(self.connection)
        lib.pn_collector_free(self.collector)
        self.transport = self.connection = self.collector = None


def read_condition(cond: object) -> tuple[str, str] | None:
    """(name, description) of a proton condition, or None when it is not set."""
    if cond == ffi.NULL or not lib.pn_condition_is_set(cond):
        return None
    name = lib.pn_condition_get_name(cond)
    desc = lib.pn_condition_get_description(cond)
    return (
        ffi.string(name).decode(errors="replace") if name != ffi.NULL else "",
        ffi.string(desc).decode(errors="replace") if desc != ffi.NULL else "",
    )


def set_condition(cond: object, name: str, description: str = "") -> None:
    """Write an error condition that a close/end/detach will carry."""
    lib.pn_condition_set_name(cond, name.encode())
    if description:
        lib.pn_condition_set_description(cond, description.encode())


def copy_data(dst: object, src: object) -> None:
    """Copy an AMQP value proton holds (properties, capabilities); the source may be absent."""
    if src == ffi.NULL:
        lib.pn_data_clear(dst)
    else:
        lib.pn_data_copy(dst, src)


def copy_condition(dst: object, src: object) -> None:
    """Carry a peer's error condition (name, description, info map) to the other side."""
    if src == ffi.NULL or not lib.pn_condition_is_set(src):
        return
    lib.pn_condition_set_name(dst, lib.pn_condition_get_name(src))
    desc = lib.pn_condition_get_description(src)
    if desc != ffi.NULL:
        lib.pn_condition_set_description(dst, desc)
    copy_data(lib.pn_condition_info(dst), lib.pn_condition_info(src))
