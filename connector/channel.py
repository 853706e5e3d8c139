"""One channel's life: its endpoint, the guest connections on it, and their upstreams.

State machine (``ChannelState``):

    waiting ──header──▶ connected ──connection ends──▶ waiting
       │                    │
       └── endpoint lost ───┴──▶ waiting (unix, unix-listen: reconnect / await qemu)
                                 gone    (pty EOF/EIO/HUP, VM destroyed, channel removed)
                                 error   (the endpoint cannot be opened: permissions...)

This is where file descriptors meet the sans-IO core. The channel reads the guest side and
the upstream socket, pushes bytes into the router's engines, and writes out what they
produce, on the one asyncio loop; it never blocks and never starts a thread.

Facts from a real qemu that shape it: the host sees nothing when the guest closes its port,
and qemu hands bytes written meanwhile to the next opener. So after a guest connection ends
the channel writes nothing until a new protocol header arrives, and everything before that
header is discarded and counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import errno
import fcntl
import functools
import os
import socket
import sys
import termios
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from .channels.endpoint import Endpoint, EndpointGone, EndpointUnavailable, WrongPeer
from .channels.framing import SASL_HEADER, HeaderFound, HeaderScanner, starts_new_connection
from .channels.pty import PtyEndpoint
from .channels.unix import UnixEndpoint
from .channels.unix_listen import UnixListenEndpoint
from .identity import ChannelKind, ChannelSpec
from .limits import GuestLimits
from .logs import guest_logger
from .redirect import MAX_REDIRECTS, REDIRECT, BadRedirect, read_redirect
from .resolver import Resolver
from .routing.engine import IO_CHUNK, Engine
from .routing.route import LinkPolicy
from .routing.router import Counters, Router, RouterState
from .tls import OutputSource, TLSError, TLSSession
from .upstream import (
    ADDRESS_TIMEOUT_S,
    CLOSE_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    Address,
    BrokerPool,
    BrokerURL,
    broker_addresses,
    open_socket,
)

# Reconnect backoff for a missing or refusing endpoint: quick at first (qemu is starting),
# then no faster than every few seconds so a host with many stopped VMs stays quiet.
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
# An endpoint that fails for a reason an operator must fix (permissions) is retried slowly.
ERROR_RETRY_S = 30.0
# Errors kept per channel for `qpid-virtio-status guest NAME`.
RECENT_ERRORS = 20
# The condition a refused peer is counted under (``errors_by_condition``): a process that
# is not the channel's qemu, at its path (``WrongPeer``).
WRONG_PEER = "connector:wrong-peer"
# A refused peer is logged at most once per this many seconds (the rest are counted in
# that line and in the channel's errors): a process connecting in a loop must not flood
# the journal.
WRONG_PEER_LOG_S = 60.0
# Stop reading one side while the other side has this much waiting to be written, and
# resume below the low mark: memory per channel stays bounded whatever the peers do.
BACKLOG_HIGH = 4 * 1024 * 1024
BACKLOG_LOW = 1 * 1024 * 1024
# Most bytes read from one guest per wakeup: enough to batch a pty's 4 KiB reads into one
# pump, small enough that a flooding guest leaves the loop to the others between batches.
READ_BATCH = 256 * 1024
# Proton's timers (heartbeats, idle checks) are never served more often than this: a peer
# asking for tiny timeouts must not turn the shared loop into a busy loop.
MIN_TICK_S = 0.01
# A read that starts a new connection (header and open) after this much silence, in the
# middle of a guest connection, is taken as a new client (the old one died, maybe
# mid-frame). A live connection's message bytes would have to pause this long and resume
# with a header and a well-formed open frame to be mistaken for one.
RESTART_SILENCE_S = 0.25


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """Wrap a loop callback: a bug met while serving one guest ends that guest's
    connection with ``amqp:internal-error`` and is logged with its name; the daemon and
    the other guests go on."""

    @functools.wraps(method)
    def callback(self: Channel, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception as err:
            self.log.exception("internal error while serving this channel")
            self._record_error(f"internal error: {err!r}", "amqp:internal-error")
            self._internal_error(str(err))

    return callback


class ChannelState(enum.Enum):
    """What an operator sees in the state column."""

    WAITING = "waiting"
    CONNECTED = "connected"
    ERROR = "error"
    GONE = "gone"


def _free_engines(router: Router) -> None:
    """Free both sides' proton objects once neither the guest nor the broker needs them."""
    router.guest.free()
    if router.upstream is not None:
        router.upstream.free()


def _should_pause(paused: bool, backlog: int) -> bool:
    """Reading a side pauses above BACKLOG_HIGH and resumes only below BACKLOG_LOW."""
    return backlog >= BACKLOG_LOW if paused else backlog > BACKLOG_HIGH


def _bytes_waiting(fd: int) -> bool:
    """Whether bytes wait to be read on a socket or pty (FIONREAD serves both)."""
    try:
        return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder) > 0
    except OSError:
        return True  # let the read that follows find out what is wrong


def make_endpoint(spec: ChannelSpec) -> Endpoint:
    """The endpoint for a channel, of its kind, for the qemu discovery found it for."""
    return {
        ChannelKind.UNIX: UnixEndpoint,
        ChannelKind.UNIX_LISTEN: UnixListenEndpoint,
        ChannelKind.PTY: PtyEndpoint,
    }[spec.kind](spec.path, spec.identity.pid)


class _Hop(NamedTuple):
    """Where one upstream connects: the pool it is made from, the URL, the open frame's
    hostname when a redirect named one, and the failover list's URL it stands for (the
    URL itself, or the one whose redirect led here, which a failure moves the list past)."""

    pool: BrokerPool
    url: BrokerURL
    hostname: str | None
    origin: BrokerURL


class _Upstream:
    """The socket under one router's upstream engine, its TLS session, and its timers."""

    __slots__ = (
        "address_timer",
        "addresses",
        "closing_timer",
        "connect_timer",
        "connected",
        "origin",
        "out",
        "paused",
        "pool",
        "sock",
        "tls",
        "url",
        "writing",
    )

    def __init__(self, sock: socket.socket, hop: _Hop, engine: Engine) -> None:
        self.sock = sock
        self.pool = hop.pool  # the pool ``url`` came from: its failure is reported there
        self.url = hop.url
        self.origin = hop.origin  # the failover list's URL that this one stands for
        self.tls = tls = hop.pool.tls_session(hop.url, engine)
        # What the socket is written from: the engine itself, or TLS encrypting its output.
        self.out: OutputSource = engine if tls is None else tls
        self.connected = False
        self.writing = False
        self.paused = False
        self.connect_timer: asyncio.TimerHandle | None = None
        self.closing_timer: asyncio.TimerHandle | None = None
        self.addresses: list[Address] = []  # the broker's addresses not tried yet
        self.address_timer: asyncio.TimerHandle | None = None  # gives up on a silent one

    def stop_address_timer(self) -> None:
        """The connect to the current address is over, one way or the other."""
        if self.address_timer is not None:
            self.address_timer.cancel()
            self.address_timer = None


class Channel:
    """Serve one virtio-serial channel for as long as it exists.

    ``brokers`` returns the pool to open the next upstream from: it is called at each
    upstream connect, so a reload that replaces the pool reaches a running channel.
    """

    def __init__(
        self,
        spec: ChannelSpec,
        *,
        loop: asyncio.AbstractEventLoop,
        brokers: Callable[[], BrokerPool],
        limits: GuestLimits,
        policy: LinkPolicy | None = None,
    ) -> None:
        self.spec = spec
        self.state = ChannelState.WAITING
        self.since = time.time()
        self.counters = Counters()
        self.last_error: str | None = None
        self.errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_ERRORS)
        self.errors_by_condition: collections.Counter[str] = collections.Counter()
        self.idle = asyncio.Event()  # set while no guest connection or upstream is live
        self.idle.set()
        self.log = guest_logger(spec.identity.name, spec.identity.port)
        self._loop = loop
        self._brokers = brokers
        self._limits = limits
        self._policy = policy
        self._endpoint = make_endpoint(spec)
        self._scanner = HeaderScanner()
        self._sock: socket.socket | None = None
        self._fd: int | None = None
        self._wrong_peer_logged = -WRONG_PEER_LOG_S  # when a refused peer was last logged
        self._wrong_peers_quiet = 0  # refused since, not logged
        self._listening = False
        self._writing = False
        self._paused = False
        self._router: Router | None = None
        self._up: _Upstream | None = None
        # Where the next upstream goes instead of the failover list's current URL: a
        # redirect's target (``_on_redirect``), taken once (``_make_upstream``).
        self._target: _Hop | None = None
        # Where the current upstream engine was made for; its socket connects there.
        self._hop: _Hop | None = None
        self._lingering: dict[Router, _Upstream] = {}  # guest gone, upstream still closing
        self._retry: asyncio.TimerHandle | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._tick_due = 0  # the deadline (monotonic ms) the armed tick timer serves
        self._deadline_ms = 0  # the nearest deadline the engines' last tick returned
        self._close_wait: asyncio.TimerHandle | None = None  # our close awaits the guest's
        self._open_wait: asyncio.TimerHandle | None = None  # the guest's open is due
        # The broker's name being resolved for this guest connection's upstream (resolver.py).
        self._resolving: asyncio.Task[None] | None = None
        self._backoff = BACKOFF_FIRST_S
        self._closed = False
        self._last_read = 0.0  # monotonic time of the last read from the guest
        self._silence = 0.0  # how long the guest had been silent before this read

    # -- life ----------------------------------------------------------------------------

    def start(self) -> None:
        """Reach for the endpoint; retries by itself until it appears."""
        self._open_endpoint()

    def close(self, reason: str, *, gone: bool = True) -> None:
        """End the channel now: guest told ``connection:forced``, upstream closed.

        Upstreams that are still closing finish on their own (bounded by CLOSE_TIMEOUT_S);
        ``idle`` is set when they have.
        """
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        if self._router is not None:
            self._router.shutdown(reason)
            self._pump()
            if self._router is not None:
                # The fd goes next, so the guest's answering close can never be read: its
                # connection ends here, and only the upstream's close exchange is left.
                self._end_connection()
        self._release_fd()
        self._stop_listening()
        self._endpoint.close()
        self.log.info("channel %s closed: %s", self.spec.path, reason)
        self._set_state(ChannelState.GONE if gone else ChannelState.WAITING, None)
        self._update_idle()

    # -- endpoint ------------------------------------------------------------------------

    def _open_endpoint(self) -> None:
        self._retry = None
        if self._closed:
            return
        try:
            result = self._endpoint.connect()
        except WrongPeer as err:
            if not self._wrong_peer(str(err)):
                return
            result = None  # a listener: listen on for the peer it is for
        except EndpointUnavailable as err:
            self._stop_listening()
            self._note_wait(f"{self.spec.path}: {err}")
            self._schedule_retry(self._backoff)
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
            return
        except EndpointGone as err:
            self._error(f"{self.spec.path}: {err}", state=ChannelState.GONE)
            return
        except OSError as err:
            self._stop_listening()
            self._error(f"{self.spec.path}: {err.strerror or err}", state=ChannelState.ERROR)
            self._schedule_retry(ERROR_RETRY_S)
            return
        listen_fd = self._endpoint.listen_fd()
        if listen_fd is not None and not self._listening:
            self._loop.add_reader(listen_fd, self._on_listen_readable)
            self._listening = True
        if result is None:
            self._set_state(ChannelState.WAITING, None)
            return
        self._attach_fd(result)

    def _wrong_peer(self, why: str) -> bool:
        """A peer the endpoint refused (not the qemu this channel was discovered for):
        logged (the guest's name with it) and counted. A listener listens on for its own
        qemu (True); a socket connected to is someone else's, an error retried slowly."""
        message = f"{self.spec.path}: {why}"
        now = time.monotonic()
        if now - self._wrong_peer_logged >= WRONG_PEER_LOG_S:
            quiet, self._wrong_peers_quiet = self._wrong_peers_quiet, 0
            more = f" ({quiet} more refused since the last line)" if quiet else ""
            self.log.warning("%s%s", message, more)
            self._wrong_peer_logged = now
        else:
            self._wrong_peers_quiet += 1
        self._record_error(message, WRONG_PEER)
        if self._endpoint.listen_fd() is not None:
            return True
        self._set_state(ChannelState.ERROR, None)
        self._schedule_retry(ERROR_RETRY_S)
        return False

    def _stop_listening(self) -> None:
        """Until the retry: a peer waiting to be accepted keeps the listening socket
        readable, so a failed accept (no descriptor left) would run again at once, forever."""
        if self._listening:
            self._loop.remove_reader(self._endpoint.listen_fd())
            self._listening = False

    def _schedule_retry(self, delay: float) -> None:
        if not self._closed:
            self._retry = self._loop.call_later(delay, self._open_endpoint)

    @_guarded
    def _on_listen_readable(self) -> None:
        if self._fd is not None:
            if self._endpoint.reject_extra():  # type: ignore[attr-defined]
                self.log.warning("refused a second peer on %s: one at a time", self.spec.path)
            return
        self._open_endpoint()

    def _attach_fd(self, conn: socket.socket | int) -> None:
        if isinstance(conn, socket.socket):
            self._sock = conn
            self._fd = conn.fileno()
        else:
            self._fd = conn
        self._backoff = BACKOFF_FIRST_S
        self._loop.add_reader(self._fd, self._on_guest_readable)
        self._set_state(ChannelState.WAITING, None)
        self.last_error = None
        self.log.info("channel %s open (%s)", self.spec.path, self.spec.kind.value)

    def _release_fd(self) -> None:
        if self._fd is None:
            return
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if self._sock is not None:
            self._sock.close()
        else:
            os.close(self._fd)
        self._sock = None
        self._fd = None
        self._paused = False

    def _peer_lost(self, why: str) -> None:
        """The far end of the channel went away (qemu exited or disconnected)."""
        self.log.info("channel %s: peer lost (%s)", self.spec.path, why)
        if self._router is not None:
            self._router.guest_gone(why)
            self._end_connection()
        self._release_fd()
        if self._endpoint.peer_lost_means_gone():
            self._error(f"{self.spec.path}: {why}", state=ChannelState.GONE)
            self._closed = True
            self._endpoint.close()
        elif not self._closed:
            self._set_state(ChannelState.WAITING, None)
            if not self._listening:
                self._schedule_retry(BACKOFF_FIRST_S)
        self._update_idle()

    # -- guest side I/O --------------------------------------------------------------------

    @_guarded
    def _on_guest_readable(self) -> None:
        # A pty hands out at most about 4 KiB per read, so one read per wakeup would cost a
        # whole pump per three or four messages: read until the fd is empty (bounded, so
        # one flooding guest cannot hold the loop) and pump once. A socket's short read
        # already says it is empty.
        now = time.monotonic()
        self._silence = now - self._last_read
        self._last_read = now
        chunks = []
        total = 0
        eof = None
        while total < READ_BATCH:
            try:
                data = self._sock.recv(IO_CHUNK) if self._sock else os.read(self._fd, IO_CHUNK)
            except BlockingIOError:
                break
            except OSError as err:  # EIO on a pty whose master closed
                eof = err.strerror or str(err)
                break
            if not data:
                eof = "EOF"
                break
            chunks.append(data)
            total += len(data)
            if self._sock is not None and len(data) < IO_CHUNK:
                break  # a socket hands over all it has: it is empty now, skip the EAGAIN read
        if chunks:
            self._guest_bytes(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if eof is not None and self._fd is not None:
            self._peer_lost(eof)

    def _guest_bytes(self, data: bytes) -> None:
        router = self._router
        if router is None:
            found = self._scanner.feed(data)
            self._note_wrong_protocols()
            self.counters.discarded_bytes = self._scanner.discarded
            if found is None:
                return
            self._start_connection(found)
        elif self._restarted(data):
            self.log.info(
                "a protocol header after %.1fs of silence: the guest's client restarted",
                self._silence,
            )
            router.guest_gone("the guest's client restarted")
            self._resync(data)
            return
        elif not router.feed_guest(data) and self._resync(data):
            return
        self._pump()

    def _restarted(self, data: bytes) -> bool:
        """A read that begins a new connection (a header and an open) after a silence,
        mid-connection, is a new client: the old one died (the host cannot see that),
        perhaps in the middle of a frame, which the new client's bytes would otherwise go
        on filling."""
        return self._silence >= RESTART_SILENCE_S and starts_new_connection(data)

    def _resync(self, data: bytes) -> bool:
        """The guest's connection failed on this read; if the read holds a new protocol
        header (the guest restarted its client mid-connection, which the host cannot see),
        end the old connection and start the new one from that header."""
        found = HeaderScanner().feed(data)
        if found is None:
            return False
        # The old connection's events are handled, so its error reaches the upstream (which
        # _end_connection closes), but nothing of it is written to the guest: its close is
        # for a client that is gone, and the new one must read its own header first.
        self._router.process()
        self._end_connection()
        self.log.info("new protocol header inside the old connection's stream; restarting")
        self._start_connection(found)
        self._pump()
        return True

    def _start_connection(self, found: HeaderFound) -> None:
        if found.discarded:
            self.log.info("discarded %d bytes before the protocol header", found.discarded)
        engine = Engine(server=True)
        engine.configure_sasl("ANONYMOUS EXTERNAL")
        lim = self._limits
        engine.set_limits(
            max_frame=lim.max_frame_size,
            channel_max=lim.max_sessions - 1,
            idle_timeout_ms=int(lim.idle_timeout_s * 1000),
        )
        ident = self.spec.identity
        self._router = Router(
            engine,
            make_upstream=self._make_upstream,
            identity_properties=ident.open_properties(self.spec.path),
            log=self.log,
            counters=self.counters,
            limits=lim,
            policy=self._policy,
        )
        engine.push(found.header)
        if found.header == SASL_HEADER:
            # EXTERNAL: the identity is the channel's, whatever the guest claims.
            engine.set_external_identity(f"guest:{ident.name}")
        engine.push(found.rest)
        self._set_state(ChannelState.CONNECTED, None)
        self.idle.clear()
        self._open_wait = self._loop.call_later(
            lim.open_timeout_s, self._open_timeout, self._router
        )

    def _write_guest(self) -> None:
        router = self._router
        if router is None or self._fd is None:
            return
        eng = router.guest
        while True:
            out = eng.peek_output()
            if not out:
                break
            try:
                n = self._sock.send(out) if self._sock else os.write(self._fd, out)
            except BlockingIOError:
                n = 0
            except OSError as err:
                self._peer_lost(err.strerror or str(err))
                return
            if n:
                eng.pop_output(n)
            if n < len(out):
                if not self._writing:
                    self._loop.add_writer(self._fd, self._on_guest_writable)
                    self._writing = True
                return
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    @_guarded
    def _on_guest_writable(self) -> None:
        # Nothing new has arrived, so no events to process: just write. A pty takes about
        # 4 KiB per write, so this runs often while the broker sends to a guest.
        router = self._router
        if router is None:
            return
        self._write_guest()
        up = self._up
        if up is not None and up.paused:
            self._apply_backpressure(router, up)
        if router.guest_finished():
            self._pump()

    # -- upstream I/O --------------------------------------------------------------------

    def _make_upstream(self) -> Engine:
        """Called by the router when the guest's open arrives, and for a redirect's target;
        ``_connect_upstream`` then connects the engine's socket to the same place."""
        hop = self._hop = self._next_broker()
        self._target = None
        return hop.pool.make_engine(hop.url, hop.hostname)

    def _next_broker(self) -> _Hop:
        """Where the next upstream goes: a redirect's target if one waits, else the
        failover list's current URL. A target from before a reload that changed
        ``[broker]`` is dropped: the operator's new brokers win over the old one's word."""
        pool = self._brokers()
        if self._target is not None and self._target.pool is pool:
            return self._target
        self._target = None
        return _Hop(pool, pool.current, None, pool.current)

    def _connect_upstream(self, router: Router) -> None:
        """Start the upstream's TCP connect; first, off the loop, the broker's name lookup
        when its host is a name (``_resolve``)."""
        hop = self._hop
        assert hop is not None  # the router made its upstream engine first
        router.upstream_name = str(hop.url)
        if not Resolver.is_address(hop.url.host):
            self._resolving = self._loop.create_task(self._resolve(router, hop))
            return
        try:
            addresses = broker_addresses(hop.url)  # an address: answered at once
        except OSError as err:
            self._cannot_connect(router, hop, err)
            return
        self._open_upstream(router, hop, addresses)

    async def _resolve(self, router: Router, hop: _Hop) -> None:
        """Look the broker's name up, bounded by CONNECT_TIMEOUT_S, then connect."""
        try:
            addresses = await asyncio.wait_for(
                Resolver.for_loop(self._loop).addresses(hop.url), CONNECT_TIMEOUT_S
            )
        except TimeoutError:
            why = f"no answer to its name lookup in {CONNECT_TIMEOUT_S}s"
            error = OSError(errno.ETIMEDOUT, why)
        except OSError as err:
            error = err
        else:
            error = None
        self._resolved(router, hop, [] if error else addresses, error)

    @_guarded
    def _resolved(
        self, router: Router, hop: _Hop, addresses: list[Address], error: OSError | None
    ) -> None:
        if router is not self._router or router.upstream_dead:
            # The guest connection ended meanwhile. (Python 3.11's wait_for hands back an
            # answer that came as the task was cancelled.) ``_resolving`` may be the next
            # connection's lookup by now: not ours to clear.
            return
        self._resolving = None
        if error is not None:
            self._cannot_connect(router, hop, error)
        else:
            self._open_upstream(router, hop, addresses)
        self._pump_router(router, self._up)

    def _cannot_connect(self, router: Router, hop: _Hop, err: OSError) -> None:
        hop.pool.failed(hop.origin)
        router.upstream_failed(f"cannot connect to {hop.url}: {err.strerror or err}")

    def _open_upstream(self, router: Router, hop: _Hop, addresses: list[Address]) -> None:
        """Start the TCP connect to the first of ``addresses`` that takes one."""
        try:
            sock = open_socket(hop.url, addresses)
        except OSError as err:
            self._cannot_connect(router, hop, err)
            return
        up = _Upstream(sock, hop, router.upstream)
        up.addresses = addresses
        self._up = up
        self._await_connect(router, up)
        up.connect_timer = self._loop.call_later(
            CONNECT_TIMEOUT_S, self._upstream_timeout, router, up
        )

    def _await_connect(self, router: Router, up: _Upstream) -> None:
        """Wait for the connect started on ``up.sock``; while the broker's host has other
        addresses, wait for this one only ADDRESS_TIMEOUT_S."""
        self._loop.add_writer(up.sock.fileno(), self._on_upstream_connected, router, up)
        up.writing = True
        if up.addresses:
            up.address_timer = self._loop.call_later(
                ADDRESS_TIMEOUT_S, self._address_silent, router, up
            )

    def _next_address(self, router: Router, up: _Upstream, why: str) -> OSError | None:
        """Give up the connect in progress and start one to the next address; the error
        when no address is left that takes one."""
        self.log.debug("cannot connect to %s: %s; trying its next address", up.url, why)
        if up.writing:
            self._loop.remove_writer(up.sock.fileno())
            up.writing = False
        up.stop_address_timer()
        up.sock.close()
        try:
            up.sock = open_socket(up.url, up.addresses)
        except OSError as err:
            return err
        self._await_connect(router, up)
        return None

    @_guarded
    def _address_silent(self, router: Router, up: _Upstream) -> None:
        up.address_timer = None
        if up.connected or self._up is not up:
            return
        failed = self._next_address(router, up, f"no answer in {ADDRESS_TIMEOUT_S:g}s")
        if failed is not None:
            self._upstream_broken(router, up, f"cannot connect to {up.url}: {failed.strerror}")

    @_guarded
    def _on_upstream_connected(self, router: Router, up: _Upstream) -> None:
        self._loop.remove_writer(up.sock.fileno())
        up.writing = False
        up.stop_address_timer()
        err = up.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err and up.addresses:  # the broker's host has another address: try it
            failed = self._next_address(router, up, os.strerror(err))
            if failed is None:
                return
            err = failed.errno or err
        if err:
            self._upstream_broken(router, up, f"cannot connect to {up.url}: {os.strerror(err)}")
            return
        up.connected = True
        self._loop.add_reader(up.sock.fileno(), self._on_upstream_readable, router, up)
        self._pump_router(router, up)

    @_guarded
    def _upstream_timeout(self, router: Router, up: _Upstream) -> None:
        up.connect_timer = None
        if router.state is not RouterState.OPENING:
            return
        if router.open_refused:
            why = (
                f"{up.url} announced in its open that it would not serve the connection "
                f"(connection-establishment-failed), then sent no close in {CONNECT_TIMEOUT_S}s"
            )
        else:
            why = f"no answer from {up.url} in {CONNECT_TIMEOUT_S}s"
        self._upstream_broken(router, up, why)

    @_guarded
    def _on_upstream_readable(self, router: Router, up: _Upstream) -> None:
        try:
            data = up.sock.recv(IO_CHUNK)
        except BlockingIOError:
            return
        except OSError as err:
            self._upstream_broken(router, up, f"{up.url}: {err.strerror or err}")
            return
        if up.tls is not None:
            if not self._upstream_tls_input(router, up, up.tls, data):
                return
        elif data:
            router.upstream.push(data)
        elif not self._upstream_ended(router, up):
            return
        self._pump_router(router, up)

    def _upstream_tls_input(
        self, router: Router, up: _Upstream, tls: TLSSession, data: bytes
    ) -> bool:
        """Decrypt what the broker sent (``data``, empty at the socket's end of stream) into
        the upstream engine; False when TLS failed (the upstream is then dropped). The
        broker's close_notify ends its stream as a TCP EOF does; an EOF before it is a TLS
        stream cut short."""
        try:
            if data:
                plain = tls.receive(data)
            else:
                tls.stream_ended()
                plain = b""
        except TLSError as err:
            self._upstream_broken(router, up, f"{up.url}: {err}")
            return False
        if plain:
            router.upstream.push(plain)
        if not data or tls.peer_closed:
            return self._upstream_ended(router, up)
        return True

    def _upstream_ended(self, router: Router, up: _Upstream) -> bool:
        """The broker's stream ended (TCP end of stream, TLS close_notify). After its AMQP
        close that is the clean end. Before it the broker hung up (it crashed, or refused
        us without a word), which is named with its URL, as every upstream failure is,
        rather than as proton's framing error; the upstream is then dropped (False)."""
        if router.broker_closed():
            router.upstream.close_input()
            return True
        when = "before its AMQP open" if router.state is RouterState.OPENING else "mid-connection"
        self._upstream_broken(router, up, f"{up.url} hung up {when}")
        return False

    def _upstream_broken(self, router: Router, up: _Upstream, reason: str) -> None:
        router.upstream_failed(reason)
        self._drop_upstream(router, up)
        if router is self._router:  # a lingering one's engines went with its upstream
            self._pump_router(router, None)

    def _write_upstream(self, router: Router, up: _Upstream) -> bool:
        """Write what the upstream has to send, as much as its socket takes.

        False when writing failed (TLS or the socket): the upstream has then been dropped
        and the router pumped without it, so the caller must not touch ``up`` again.
        """
        if not up.connected:
            return True
        src = up.out  # the engine, or TLS over it: ciphertext it has not sent comes first
        fd = up.sock.fileno()
        while True:
            try:
                out = src.peek_output()
            except TLSError as err:
                self._upstream_broken(router, up, f"{up.url}: {err}")
                return False
            if not out:
                break
            try:
                n = up.sock.send(out)
            except BlockingIOError:
                n = 0
            except OSError as err:
                self._upstream_broken(router, up, f"{up.url}: {err.strerror or err}")
                return False
            if n:
                src.pop_output(n)
            if n < len(out):
                if not up.writing:
                    self._loop.add_writer(fd, self._on_upstream_writable, router, up)
                    up.writing = True
                return True
        if up.writing:
            self._loop.remove_writer(fd)
            up.writing = False
        return True

    @_guarded
    def _on_upstream_writable(self, router: Router, up: _Upstream) -> None:
        self._pump_router(router, up)

    def _internal_error(self, description: str) -> None:
        """Recover from a bug: end the current guest connection, keep the channel."""
        router = self._router
        if router is None:
            return
        try:
            router.violation("amqp:internal-error", description)
            self._pump()
        except Exception:  # the connection is beyond saving; drop it
            self.log.exception("could not close the guest connection cleanly")
        if self._router is router:
            self._end_connection()

    def _drop_upstream(self, router: Router, up: _Upstream) -> None:
        """Close the upstream socket (after the close exchange, a failure, or a timeout)."""
        self._close_socket(up)
        if self._up is up:
            self._up = None
        router.uncount_unsent(upstream=True)
        if router.failed_opening:  # refused, unreachable, or hung up before its open
            # To the pool it came from: a connect begun before a reload (with the old
            # password, say) says nothing of the new pool's brokers. For a redirect's
            # target, the list moves past the URL that sent us there.
            up.pool.failed(up.origin)
        if self._lingering.pop(router, None) is not None:
            _free_engines(router)
        self._update_idle()

    def _close_socket(self, up: _Upstream) -> None:
        """Stop ``up``'s timers and I/O and close its socket."""
        for timer in (up.connect_timer, up.closing_timer, up.address_timer):
            if timer is not None:
                timer.cancel()
        fd = up.sock.fileno()
        if fd >= 0:
            if up.connected:
                self._loop.remove_reader(fd)
                if up.tls is not None:  # best effort: close_notify, or why the handshake failed
                    with contextlib.suppress(OSError):
                        up.sock.send(up.tls.close())
            if up.writing:
                self._loop.remove_writer(fd)
            up.sock.close()
        up.writing = False

    def _on_redirect(self, router: Router, up: _Upstream, info: dict[Any, Any]) -> bool:
        """The broker closed with a redirect, which the guest never sees. Before the guest's
        open is answered it is followed: ``up`` is closed and the router goes on with an
        engine for the target, which the pump then connects (True). Otherwise the guest's
        connection ends with ``amqp:connection:forced`` naming the target, and this channel's
        next connection goes there, once: the broker asked for it, and a target that fails
        leaves the next one to the failover list. A target that is not usable as it is, or
        one redirect too many, is an upstream failure like any other."""
        try:
            target = read_redirect(info, up.url.scheme)
        except BadRedirect as err:
            self._record_error(f"{up.url} redirected the connection: {err}", REDIRECT)
            router.upstream_failed(f"{up.url} redirected the connection to no usable target: {err}")
            return False
        url = target.url(up.url)
        opening = router.state is RouterState.OPENING
        if opening and router.redirects < MAX_REDIRECTS:
            self.log.info(
                "%s redirected the connection to %s; following (redirect %d of at most %d)",
                up.url, url, router.redirects + 1, MAX_REDIRECTS,
            )  # fmt: skip
            self._record_error(f"{up.url} redirected the connection to {url}: followed", REDIRECT)
            self._close_socket(up)
            self._up = None
            # Followed now, in this pump: under the current pool, even if a reload replaced
            # the one the redirecting broker's URL came from.
            self._target = _Hop(self._brokers(), url, target.hostname, up.origin)
            router.follow_redirect(self._make_upstream())
            return True
        self._record_error(f"{up.url} redirected the connection to {url}", REDIRECT)
        if opening:
            why = f"redirect loop: {MAX_REDIRECTS} redirects followed, then {up.url} to {url}"
        else:
            self._target = _Hop(up.pool, url, target.hostname, up.origin)
            why = f"{up.url} redirected the connection to {url}; the next connection goes there"
        router.upstream_failed(why)
        return False

    # -- the pump: after any I/O -----------------------------------------------------------

    def _pump(self) -> None:
        """Process the current connection's events and write both sides."""
        router = self._router
        if router is not None:
            self._pump_router(router, self._up)

    def _pump_router(self, router: Router, up: _Upstream | None) -> None:
        live = router is self._router
        if live:
            self._tick_engines(router)
        router.process()
        if up is not None and router.redirect is not None and live:
            if self._on_redirect(router, up, router.redirect):
                up = None  # the router's new engine is connected just below
            router.redirect = None
        if (
            router.upstream is not None
            and up is None
            and not router.upstream_dead
            and live
            and self._resolving is None
        ):
            self._connect_upstream(router)
            up = self._up
            router.process()
        if up is not None and router.upstream_dead:
            self._drop_upstream(router, up)
            up = None
        if live:
            self._write_guest()
        if up is not None:
            if not self._write_upstream(router, up):
                return  # the upstream failed and was dropped; that pump did the rest
            if router.upstream_closed() and up.out.output_pending() <= 0:
                self._drop_upstream(router, up)
                up = None
            elif live:
                self._apply_backpressure(router, up)
        if live:
            self._flow_control(router)
            if router.guest_finished():
                self._end_connection()
                return
            self._schedule_tick()
            if self._close_wait is None and router.awaiting_guest_close():
                self._close_wait = self._loop.call_later(CLOSE_TIMEOUT_S, self._guest_close_timeout)
        if router.events_pending():  # posted while writing: handled now, not at a wake-up
            self._loop.call_soon(self._repump, router)

    @_guarded
    def _repump(self, router: Router) -> None:
        """Pump ``router`` again if it is still served: its guest connection, or its upstream
        lingering in the close exchange."""
        if router is self._router:
            self._pump()
        elif router in self._lingering:
            self._pump_router(router, self._lingering[router])

    def _backlog(self, engine: Engine | None) -> int:
        return engine.backlog() if engine is not None else 0

    def _flow_control(self, router: Router) -> None:
        """Stop reading the guest while the broker side has too much waiting to go out."""
        if self._fd is None:
            return
        # A dead upstream's backlog never drains: it must not keep the guest unread.
        backlog = 0 if router.upstream_dead else self._backlog(router.upstream)
        paused = _should_pause(self._paused, backlog)
        if paused != self._paused:
            if paused:
                self._loop.remove_reader(self._fd)
                router.guest.input_paused()
            else:
                self._loop.add_reader(self._fd, self._on_guest_readable)
                router.guest.input_resumed(_bytes_waiting(self._fd))
            self._paused = paused

    def _apply_backpressure(self, router: Router, up: _Upstream) -> None:
        """Stop reading the broker while the guest side has too much waiting to go out."""
        paused = _should_pause(up.paused, self._backlog(router.guest))
        if paused != up.paused:
            fd = up.sock.fileno()
            if paused:
                self._loop.remove_reader(fd)
                router.upstream.input_paused()
            else:
                self._loop.add_reader(fd, self._on_upstream_readable, router, up)
                router.upstream.input_resumed(_bytes_waiting(fd))
            up.paused = paused

    @_guarded
    def _open_timeout(self, router: Router) -> None:
        """The guest sent a header but no open (or never finished SASL) in time."""
        self._open_wait = None
        if self._router is router and router.upstream is None:
            why = f"no AMQP open within {self._limits.open_timeout_s:g}s of the protocol header"
            self.log.warning("%s; dropping the connection", why)
            self._record_error(why, "amqp:resource-limit-exceeded")
            router.violation("amqp:resource-limit-exceeded", why)
            self._pump()
            if self._router is router:
                self._end_connection()

    @_guarded
    def _guest_close_timeout(self) -> None:
        """A guest that does not answer our close, or whose port takes no more of it, is not
        waited for any longer."""
        self._close_wait = None
        if self._router is not None and self._router.awaiting_guest_close():
            self.log.info("guest did not answer our close in %ss", CLOSE_TIMEOUT_S)
            self._end_connection()

    def _end_connection(self) -> None:
        """The guest connection is over; the channel waits for the next header.

        An upstream whose close exchange is still running lingers (bounded by
        CLOSE_TIMEOUT_S) while the channel already serves the next guest connection.
        """
        router = self._router
        self._router = None
        for timer in (self._tick, self._close_wait, self._open_wait, self._resolving):
            if timer is not None:
                timer.cancel()
        self._tick = self._close_wait = self._open_wait = self._resolving = None
        if router is None:
            return
        if self._paused and self._fd is not None:
            # Backpressure on the guest was for this connection's upstream: the next
            # header, or the guest's hang-up, must be read whatever that upstream holds.
            self._loop.add_reader(self._fd, self._on_guest_readable)
            self._paused = False
        if self._writing and self._fd is not None:
            # What this connection had not written goes with it (nothing is written until
            # the next header); a writer left waiting would spin once the port drains.
            self._loop.remove_writer(self._fd)
            self._writing = False
        if router.error:
            self._record_error(f"{router.error[0]}: {router.error[1]}", router.error[0])
        router.uncount_unsent(upstream=False)
        self.log.info("guest connection ended")
        up = self._up
        self._up = None
        if up is not None and not router.upstream_dead:
            router.close_upstream()
            router.process()
            if self._write_upstream(router, up):
                if up.paused:  # for a guest that is gone: the broker's close must be read
                    self._loop.add_reader(up.sock.fileno(), self._on_upstream_readable, router, up)
                    up.paused = False
                self._lingering[router] = up
                up.closing_timer = self._loop.call_later(
                    CLOSE_TIMEOUT_S, self._drop_upstream, router, up
                )
            else:  # writing our close failed, and dropped the upstream
                _free_engines(router)
        else:
            if up is not None:
                self._drop_upstream(router, up)
            else:
                router.uncount_unsent(upstream=True)
            _free_engines(router)
        if self.state is ChannelState.CONNECTED:
            self._set_state(ChannelState.WAITING, None)
        self._update_idle()

    # -- timers ----------------------------------------------------------------------------

    def _tick_engines(self, router: Router) -> None:
        """Advance both engines' clocks before their events are processed, so that what a
        tick produces (a heartbeat due to a peer, a peer's idle timeout) is handled and
        written by this same pump; note the nearest deadline for the timer.

        Every pump ticks, not only the timer: a deadline can come nearer at any time (the
        broker's open brings its idle timeout long after the guest's open armed the timer),
        and a heartbeat that waits for a far timer lets the broker cut a quiet guest."""
        now_ms = int(time.monotonic() * 1000)
        nearest = router.guest.tick(now_ms)
        if router.upstream is not None:
            due = router.upstream.tick(now_ms)
            if due > 0 and (nearest <= 0 or due < nearest):
                nearest = due
        self._deadline_ms = nearest

    def _schedule_tick(self) -> None:
        """Arm the timer for the nearest deadline the last tick found, unless it is already
        armed for that or earlier."""
        due = self._deadline_ms
        if not due or self._router is None:
            return
        if self._tick is not None:
            if self._tick_due <= due:
                return
            self._tick.cancel()
        delay = max(MIN_TICK_S, (due - time.monotonic() * 1000) / 1000)
        self._tick = self._loop.call_later(delay, self._on_tick)
        self._tick_due = due

    @_guarded
    def _on_tick(self) -> None:
        self._tick = None
        self._pump()  # the pump ticks the engines, writes what that produced, re-arms

    # -- state and errors ------------------------------------------------------------------

    def _set_state(self, state: ChannelState, error: str | None) -> None:
        if state is not self.state:
            self.state = state
            self.since = time.time()
        if error:
            self._record_error(error)

    def _note_wait(self, why: str) -> None:
        if self.last_error != why:
            self.log.info("waiting for %s", why)
        self.last_error = why

    def _error(self, message: str, *, state: ChannelState) -> None:
        self.log.warning("%s", message)
        self._set_state(state, message)

    def _record_error(self, message: str, condition: str = "connector:channel") -> None:
        self.last_error = message
        self.errors.append({"time": time.time(), "condition": condition, "description": message})
        self.errors_by_condition[condition] += 1

    def _note_wrong_protocols(self) -> None:
        for what in self._scanner.wrong:
            self.log.warning("guest sent %s; discarded", what)
            self._record_error(f"wrong protocol: {what}", "connector:wrong-protocol")
        self._scanner.wrong.clear()

    def _update_idle(self) -> None:
        if self._router is None and not self._lingering and self._up is None:
            self.idle.set()
        else:
            self.idle.clear()

    # -- inspection ------------------------------------------------------------------------

    @property
    def router(self) -> Router | None:
        """The live guest connection's router, if a guest is connected."""
        return self._router

    def routed_deliveries(self) -> tuple[int, int]:
        """(to the broker, to the guest): deliveries routed so far. Those proton still holds
        for want of credit count once they go, so that neither number ever goes back, as
        an interface's counters do not."""
        held_in = held_out = 0
        for router in (self._router, *self._lingering):
            if router is not None:
                held_in += router.unsent(upstream=True)
                held_out += router.unsent(upstream=False)
        return self.counters.deliveries_in - held_in, self.counters.deliveries_out - held_out

    @property
    def upstream_url(self) -> str | None:
        """The broker this channel's guest connection goes to, while it has one (its name
        being looked up included)."""
        if self._up is not None:
            return str(self._up.url)
        if self._resolving is not None and self._router is not None:
            return self._router.upstream_name
        return None

    @property
    def upstream_local_address(self) -> str | None:
        """Our end of the upstream socket (host:port), which the broker lists as the peer."""
        if self._up is None or not self._up.connected:
            return None
        try:
            host, port = self._up.sock.getsockname()[:2]
        except OSError:
            return None
        return f"{host}:{port}"
