"""Run a proton connection over any file descriptor, for a standard ``MessagingHandler``.

proton's ``Container`` only knows TCP URLs. Inside a guest the AMQP peer is a virtio-serial
port, so this module drives proton's engine (``Connection``, ``Transport``, ``Collector``)
itself with ``poll`` over a raw fd, and dispatches the collector's events to the
application's handler exactly as the container would. It stands in for the container in
the places a handler touches it (``event.container``): ``connect``, ``create_sender``,
``create_receiver``, ``schedule``, ``declare_transaction``, ``stop``, ``container_id``.

A guest application changes one line::

    Container(Handler()).run()           # before: TCP to a URL
    Driver(Handler(), "org.qpid.amqp.0").run()   # after: the virtio-serial port

The same driver is the host-side tests' simulated guest, over a pty master or a socket.

Connection life: the fd is opened (``opener``), stale bytes drained, then the transport
is bound. A protocol header answered by leftovers, or by nothing within ANSWER_TIMEOUT, is
sent again on a drained port (HANDSHAKE_RETRIES times). End of stream,
``POLLHUP``/``POLLERR`` or an idle-timeout expiry ends the transport; with ``reconnect``
the driver reopens the port after a backoff and rebinds the same ``Connection`` (proton
re-sends its open, sessions and links), as the container does.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import time
import uuid
from collections.abc import Callable
from typing import Any

from proton import Collector, Connection, Endpoint, Event, Transport, Url
from proton.reactor import Container

from . import port as _port

log = logging.getLogger(__name__)

# AMQP idle timeout we advertise (seconds). The peer must send something at least this
# often; a pty host side that vanished is only noticed this way (the guest sees no HUP).
DEFAULT_IDLE_TIMEOUT = 16.0
# Backoff between reconnect attempts (seconds): fast first retry, capped so a host that is
# gone for long does not spin the guest's CPU.
RECONNECT_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)
# Largest single read from the fd; proton's input buffer grows to take it, and big reads
# cost far less CPU per byte than proton's initial 8 KiB capacity.
READ_SIZE = 256 * 1024
# Times a connection attempt starts over when leftovers answered its protocol header
# (see Driver._stale_answer) or nothing did (see ANSWER_TIMEOUT); one suffices in
# practice, a second covers a slow host.
HANDSHAKE_RETRIES = 2
# How long a protocol header may go without a single byte back before the attempt starts
# over (seconds). The host answers a header at once; silence means our header went into a
# dead client's unfinished frame: a client that died mid-message leaves its last bytes in
# flight (qemu still delivers them after the port is closed), and a header that follows
# them within the host's RESTART_SILENCE_S (0.25 s) cannot be told from frame bytes. Sent
# again after this silence, it is (measured with a real guest, unix and pty channels).
ANSWER_TIMEOUT = 1.0
# How long the opener waits for the host side to be present before trying again, and how
# often it looks meanwhile.
HOST_WAIT = 1.0
HOST_POLL = 0.05

Opener = Callable[[], int]


class Task:
    """A scheduled call of ``handler.on_timer_task``; like ``proton.reactor.Task``."""

    _counter = itertools.count()

    def __init__(self, deadline: float, handler: Any) -> None:
        self.deadline = deadline
        self.handler = handler
        self.cancelled = False
        self._order = next(self._counter)

    def __lt__(self, other: Task) -> bool:
        return (self.deadline, self._order) < (other.deadline, other._order)

    def cancel(self) -> None:
        """Stop the task from firing; safe to call after it fired."""
        self.cancelled = True


class DriverEvent:
    """An event the driver makes itself (start, timer, disconnected), shaped like proton's.

    Handlers read ``event.container``/``event.connection``/``event.transport`` from it, and
    ``dispatch`` walks ``handler.handlers`` as ``proton.Event.dispatch`` does.
    """

    def __init__(self, method: str, driver: Driver, **attrs: Any) -> None:
        self.method = method
        self.container = driver
        self.reactor = driver
        self.connection = driver.connection
        self.transport = driver.transport
        self.link = None
        self.session = None
        self.delivery = None
        self.__dict__.update(attrs)

    def dispatch(self, handler: Any) -> None:
        """Call ``handler.<method>`` (or its ``on_unhandled``), then its child handlers."""
        method = getattr(handler, self.method, None)
        if method is not None:
            method(self)
        elif hasattr(handler, "on_unhandled"):
            handler.on_unhandled(self.method, self)
        for child in getattr(handler, "handlers", ()):
            self.dispatch(child)


def port_opener(name: str, **roots: str) -> Opener:
    """An opener for a virtio-serial port: find, open, wait for the host, drain stale bytes."""

    def open_it() -> int:
        fd = _port.open_port(name, **roots)
        try:
            deadline = time.monotonic() + HOST_WAIT
            while not _port.host_connected(fd):
                if time.monotonic() >= deadline:
                    raise ConnectionRefusedError(f"host side of {name} is not connected")
                # POLLHUP is a level, not an event: poll() returns at once while the host
                # is absent, so there is nothing to wait on but the clock.
                time.sleep(HOST_POLL)
            discarded = _port.drain(fd)
            if discarded:
                log.info("discarded %d stale bytes from %s", discarded, name)
            return fd
        except BaseException:
            os.close(fd)
            raise

    return open_it


class Driver:
    """One AMQP connection over a file descriptor, driven with ``poll``.

    ``target`` is a port name or path (``str``, reopened on reconnect), an fd (``int``,
    used once and never closed by the driver unless ``close_fd``), or an opener callable
    returning a fresh fd (drained already). ``handler`` receives every proton event;
    ``on_start`` comes first, with ``event.container`` being this driver.

    ``server=True`` runs the passive side (a server transport; the handler opens the
    connection and links in answer to the peer's): tests use it to play the broker.
    """

    def __init__(
        self,
        handler: Any,
        target: str | int | Opener,
        *,
        container_id: str | None = None,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        reconnect: bool | None = None,
        hostname: str | None = None,
        properties: dict[Any, Any] | None = None,
        sasl_mechanisms: str | None = None,
        max_frame_size: int | None = None,
        close_fd: bool = False,
        server: bool = False,
    ) -> None:
        self.handler = handler
        self.container_id = container_id or str(uuid.uuid4())
        self.idle_timeout = idle_timeout
        self.hostname = hostname
        self.properties = properties
        self.sasl_mechanisms = sasl_mechanisms
        self.max_frame_size = max_frame_size
        self.server = server
        if isinstance(target, int):
            fd = target
            self._opener: Opener = lambda: fd
            self._close_fd = close_fd
            self.reconnect = bool(reconnect)
        else:
            self._opener = port_opener(target) if isinstance(target, str) else target
            self._close_fd = True
            self.reconnect = True if reconnect is None else reconnect
        self.collector = Collector()
        self.connection: Connection | None = None
        self.transport: Transport | None = None
        self.fd: int | None = None
        self._timers: list[Task] = []
        self._stopped = False
        self._started = False
        self._backoff = 0
        self.eof = False  # the current fd reached end of stream: the other side is gone
        self._spoke = False  # the peer opened the connection on the current transport
        self._handshakes = 0  # header exchanges restarted: stale bytes or nothing answered
        self._restart_handshake = False
        self._heard = False  # a byte has arrived on the current transport
        self._asked_at: float | None = None  # when the current transport first wrote

    # ---- the container-like surface handlers use ---------------------------------------

    def connect(
        self, url: str | Url | None = None, handler: Any = None, **_ignored: Any
    ) -> Connection:
        """Open the one AMQP connection over the fd. ``url`` is accepted and ignored, so a
        handler written for ``Container.connect(url)`` runs unchanged."""
        if self.connection is None:
            conn = Connection()
            conn.container = self.container_id
            if self.hostname:
                conn.hostname = self.hostname
            if self.properties:
                conn.properties = self.properties
            if handler is not None:
                conn.handler = handler
            conn.collect(self.collector)
            if not self.server:
                conn.open()  # a server opens in answer to the peer's open
            self.connection = conn
            self._bind()
        return self.connection

    def create_sender(
        self,
        context: Connection | str | Url | None = None,
        target: str | None = None,
        source: str | None = None,
        name: str | None = None,
        handler: Any = None,
        tags: Callable[[], Any] | None = None,
        options: Any = None,
    ) -> Any:
        """As ``Container.create_sender``; a URL's path (or a bare address) is the target."""
        conn, address = self._context(context)
        snd = conn.session().sender(name or f"{self.container_id}-{address or 'anon'}-{_uid()}")
        if tags:
            snd.tag_generator = tags
        return _open_link(snd, source, target or address, False, handler, options)

    def create_receiver(
        self,
        context: Connection | str | Url | None = None,
        source: str | None = None,
        target: str | None = None,
        name: str | None = None,
        dynamic: bool = False,
        handler: Any = None,
        options: Any = None,
    ) -> Any:
        """As ``Container.create_receiver``; a URL's path (or a bare address) is the source."""
        conn, address = self._context(context)
        rcv = conn.session().receiver(name or f"{self.container_id}-{address or 'dyn'}-{_uid()}")
        return _open_link(rcv, source or address, target, dynamic, handler, options)

    def declare_transaction(
        self, context: Connection, handler: Any = None, settle_before_discharge: bool = False
    ) -> Any:
        """As ``Container.declare_transaction``: proton's code only needs ``create_sender``."""
        return Container.declare_transaction(self, context, handler, settle_before_discharge)  # type: ignore[arg-type]

    def schedule(self, delay: float, handler: Any = None) -> Task:
        """Call ``handler.on_timer_task(event)`` after ``delay`` seconds (default: our handler)."""
        task = Task(time.monotonic() + delay, handler if handler is not None else self.handler)
        heapq.heappush(self._timers, task)
        return task

    def stop(self) -> None:
        """Make :meth:`run` return after closing the fd; pending work is abandoned."""
        self._stopped = True

    # ---- running -------------------------------------------------------------------------

    def run(self) -> None:
        """Dispatch ``on_start`` and process events until stopped or nothing is left to do."""
        self.start()
        while self.process(None):
            pass
        self.close_fd()

    def start(self) -> None:
        """Dispatch the start event once (``on_reactor_init``, which calls ``on_start``)."""
        if not self._started:
            self._started = True
            event = DriverEvent("on_reactor_init", self)
            if hasattr(self.handler, "on_reactor_init"):
                event.dispatch(self.handler)
            else:
                DriverEvent("on_start", self).dispatch(self.handler)
            self._dispatch_collected()

    def process(self, timeout: float | None) -> bool:
        """One round: fire due timers, wait for the fd at most ``timeout`` s, move bytes,
        dispatch events. Returns False once there is nothing left to wait for."""
        self.start()
        now = time.monotonic()
        self._fire_timers(now)
        if self._stopped:
            return False
        waits = [] if timeout is None else [timeout]
        if self._timers:
            waits.append(max(0.0, self._timers[0].deadline - now))
        events = 0
        t = self.transport
        if t is not None and self.fd is not None:
            unanswered = self._unanswered_until()
            if unanswered is not None and now >= unanswered:
                self._start_over(f"no answer to our protocol header in {ANSWER_TIMEOUT} s")
                return True
            if unanswered is not None:
                waits.append(unanswered - now)
            deadline = t.tick(now)
            self._dispatch_collected()
            if deadline:
                waits.append(max(0.0, deadline - now))
            if t.capacity() > 0 and not self.eof:
                events |= select.POLLIN
            pending = t.pending()
            if pending > 0:
                events |= select.POLLOUT
            elif pending < 0 and (self.eof or t.condition is not None):
                # Output is finished and the peer is gone or the transport failed (for
                # example an idle timeout): nothing more can arrive that matters.
                t.close_tail()
            if t.closed:
                self._transport_done()
                return self._has_work()
        if not events and not waits and not self._has_work():
            return False
        wait = min(waits) if waits else None
        try:
            revents = _port.wait_fd(self.fd, events, wait)
        except InterruptedError:
            return True
        gone = revents & (select.POLLHUP | select.POLLERR)
        if events & select.POLLIN and revents & (select.POLLIN | gone):
            self._read()  # data, or the end of stream / error that the read reports
        elif gone and not revents & select.POLLOUT:
            # Hung up with nothing to read (or no room to read it) and no write possible:
            # a virtio port whose host side left blocks writes until a new host side
            # comes, which must not get this connection's bytes. The channel is gone.
            self._channel_gone("hung up")
        if revents & select.POLLOUT:
            self._write()
        self._dispatch_collected()
        return True

    def feed(self, data: bytes) -> None:
        """Give the transport bytes already read from the fd (e.g. by a caller that
        skipped junk up to a protocol header), as if the driver had read them."""
        assert self.transport is not None, "connect() first"
        self._push(data)
        self._dispatch_collected()

    def close_fd(self) -> None:
        """Close the current fd if the driver owns it."""
        if self.fd is not None and self._close_fd:
            os.close(self.fd)
        self.fd = None

    # ---- internals -----------------------------------------------------------------------

    def _has_work(self) -> bool:
        live_timers = any(not task.cancelled for task in self._timers)
        return not self._stopped and (self.transport is not None or live_timers)

    def _context(self, context: Connection | str | Url | None) -> tuple[Connection, str | None]:
        """The connection and default address named by a create_* call's first argument."""
        if isinstance(context, Connection):
            return context, None
        address = None
        if isinstance(context, Url):
            address = context.path
        elif isinstance(context, str):
            address = Url(context).path if "://" in context else context
        return self.connect(), address or None

    def _bind(self, fd: int | None = None) -> None:
        """Open the fd (unless given the one to keep) and bind a fresh transport to the
        connection."""
        assert self.connection is not None
        try:
            self.fd = self._opener() if fd is None else fd
        except OSError as e:
            log.info("cannot open the channel: %s", e)
            if not self.reconnect:
                raise
            self._schedule_reconnect()
            return
        self.eof = False
        self._spoke = False
        self._heard = False
        self._asked_at = None
        t = Transport(Transport.SERVER if self.server else Transport.CLIENT)
        t._reactor = self  # so that proton's ``event.container`` is this driver
        if self.idle_timeout:
            t.idle_timeout = self.idle_timeout
        if self.max_frame_size:
            t.max_frame_size = self.max_frame_size
        if self.sasl_mechanisms:
            t.sasl().allowed_mechs(self.sasl_mechanisms)
        t.bind(self.connection)
        self.transport = t

    def _read(self) -> None:
        assert self.transport is not None and self.fd is not None
        t = self.transport
        try:
            data = _port.read_some(self.fd, min(READ_SIZE, max(t.capacity(), 1)))
        except OSError as e:
            log.info("read failed: %s", e)
            data = b""
        if data is None:
            return
        if not data:
            self.eof = True
            t.close_tail()
            return
        self._heard = True
        self._push(data)

    def _push(self, data: bytes) -> None:
        t = self.transport
        assert t is not None
        while data:
            n = t.capacity()
            if n <= 0:
                break
            t.push(data[:n])
            data = data[n:]

    def _write(self) -> None:
        assert self.transport is not None and self.fd is not None
        t = self.transport
        pending = t.pending()
        if pending <= 0:
            return
        try:
            n = os.write(self.fd, t.peek(min(pending, READ_SIZE)))
        except BlockingIOError:
            return
        except OSError as e:
            self._channel_gone(f"write failed: {e}")
            return
        t.pop(n)
        if self._asked_at is None:
            self._asked_at = time.monotonic()

    def _channel_gone(self, why: str) -> None:
        """End the transport both ways: nothing more can be read or written on the fd."""
        assert self.transport is not None
        log.info("channel lost: %s", why)
        self.eof = True  # the other side is gone as surely as after end of stream
        self.transport.close_head()
        self.transport.close_tail()

    def _dispatch_collected(self) -> None:
        """Hand every event the engine produced to its handler (link's, or the driver's)."""
        while True:
            event = self.collector.peek()
            if event is None:
                return
            if event.type == Event.CONNECTION_REMOTE_OPEN:
                self._backoff = 0  # a working connection resets the reconnect backoff
                self._handshakes = 0
                self._spoke = True
            if event.type == Event.TRANSPORT_ERROR and self._stale_answer(event.transport):
                self._restart_handshake = True  # handled in _transport_done, not an error
            else:
                event.dispatch(event.handler or self.handler)
            self.collector.pop()

    def _stale_answer(self, transport: Transport) -> bool:
        """Whether the first bytes back were not a protocol header but leftovers.

        A host-side peer can answer our header with the end of an older connection it still
        believed open (it never saw the guest close the port). It then drops that one and
        waits for a header again, so draining and sending the header once more succeeds.
        A channel that ended (end of stream, failed write) is no such answer, even before
        the peer's open: proton reports that as a framing error too ("connection aborted").
        """
        cond = transport.condition
        return (
            not self.server
            and not self._spoke
            and not self.eof
            and self._handshakes < HANDSHAKE_RETRIES
            and cond is not None
            and cond.name == "amqp:connection:framing-error"
        )

    def _unanswered_until(self) -> float | None:
        """When our protocol header, sent and met with silence so far, is to be sent again
        (see ANSWER_TIMEOUT); None when it was answered, not sent yet, or not to be retried."""
        if (
            self.server
            or self._heard
            or self._asked_at is None
            or self._handshakes >= HANDSHAKE_RETRIES
        ):
            return None
        return self._asked_at + ANSWER_TIMEOUT

    def _start_over(self, why: str) -> None:
        """Drop the current transport and send the protocol header again on a drained
        port, keeping the connection (proton re-sends its open, sessions and links)."""
        t = self.transport
        assert t is not None
        self.transport = None
        if self.connection is not None:
            t.unbind()
        self._handshakes += 1
        log.info("%s; starting over", why)
        if self._close_fd and self.reconnect:
            self.close_fd()
            self._bind()  # the opener reopens and drains
        else:  # not ours to reopen, or no reconnecting wanted: the same fd, drained
            assert self.fd is not None
            _port.drain(self.fd)
            self._bind(self.fd)

    def _transport_done(self) -> None:
        """The transport ended: tell the handler, unbind, and reconnect if we should."""
        if self._restart_handshake:
            self._restart_handshake = False
            self._start_over("stale bytes answered our protocol header")
            return
        t = self.transport
        assert t is not None
        self.transport = None
        conn = self.connection
        if conn is not None:
            t.unbind()
        self.close_fd()
        self._dispatch_collected()
        DriverEvent("on_disconnected", self, transport=t).dispatch(self.handler)
        if (
            self.reconnect
            and not self._stopped
            and conn is not None
            and conn.state & Endpoint.LOCAL_ACTIVE
        ):
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        delay = RECONNECT_DELAYS[min(self._backoff, len(RECONNECT_DELAYS) - 1)]
        self._backoff += 1
        self.schedule(delay, _Reconnect(self))

    def _fire_timers(self, now: float) -> None:
        while self._timers and (self._timers[0].deadline <= now or self._timers[0].cancelled):
            task = heapq.heappop(self._timers)
            if not task.cancelled:
                DriverEvent("on_timer_task", self, task=task).dispatch(task.handler)
        self._dispatch_collected()


class _Reconnect:
    """Timer handler that rebinds the driver's connection to a freshly opened fd."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def on_timer_task(self, _event: DriverEvent) -> None:
        if not self.driver._stopped and self.driver.transport is None:
            self.driver._bind()


_uids = itertools.count(1)


def _uid() -> int:
    return next(_uids)


def _open_link(
    link: Any, source: str | None, target: str | None, dynamic: bool, handler: Any, options: Any
) -> Any:
    """Set a new link's termini, handler and options, and open it with its own session."""
    link.session.open()
    if source:
        link.source.address = source
    if dynamic:
        link.source.dynamic = True
    if target:
        link.target.address = target
    if handler is not None:
        link.handler = handler
    _apply_options(options, link)
    link.open()
    return link


def _apply_options(options: Any, link: Any) -> None:
    """Apply ``proton.reactor`` link options, as the container does."""
    if not options:
        return
    for option in options if isinstance(options, list) else [options]:
        if option.test(link):
            option.apply(link)


__all__ = ["DEFAULT_IDLE_TIMEOUT", "Driver", "DriverEvent", "Task", "port_opener"]
