"""Routing edges against the real daemon and real brokers (RabbitMQ 3.10 and Artemis 2.40).

Where tests/reliability/test_hostile_guests.py covers what a guest does to its own links
(resume, credit taken back, aborts, limits), this file covers what crosses the connector
end to end in the less travelled corners: a broker ending one session of a guest while its
others carry unsettled deliveries, transactions, filters, the anonymous relay's refusals,
pre-settled traffic under backpressure, many links on one session, two guests sharing the
one event loop, and the receiver settle mode negotiated end to end.
Each test checks what an operator relies on: nothing is acknowledged early, nothing is
lost, the rest of the connection goes on, and ``qpid-virtio-status`` reads right.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from proton import Delivery, Described, Endpoint, Link, Message, Terminus, symbol, ulong

from connector.guest.client import AmqpError, GuestClient
from connector.limits import GuestLimits
from tests.brokers.artemis import NO_AUTO_CREATE_PREFIX
from tests.support.connector import Routed, routed, wait_for

pytestmark = pytest.mark.broker

TIMEOUT = 30.0
DECLARE = symbol("amqp:declare:list")
DISCHARGE = symbol("amqp:discharge:list")
DECLARED = 0x33
TRANSACTIONAL_STATE = 0x34
SELECTOR_CODE = ulong(0x0000468C00000004)  # apache.org:selector-filter:string


@pytest.fixture(scope="module")
def rabbit(rabbitmq: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    """One daemon on RabbitMQ with a unix and a pty channel (guests hr-unix, hr-pty)."""
    with routed(rabbitmq, tmp_path_factory.mktemp("hr"), ("unix", "pty"), "hr") as running:
        yield running


@pytest.fixture(scope="module")
def art(artemis: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    """One daemon on Artemis with a unix and a pty channel (guests ha-unix, ha-pty)."""
    with routed(artemis, tmp_path_factory.mktemp("ha"), ("unix", "pty"), "ha") as running:
        yield running


def _name(stem: str) -> str:
    return f"hr-{stem}-{uuid.uuid4().hex[:8]}"


# ---- a guest driven by hand (small copies of test_hostile_guests.py's helpers) -------------


def _until(guest: GuestClient, cond: Callable[[], Any], what: str, link: Any = None) -> None:
    """Drive the guest's connection until ``cond()``; the peer's errors are raised."""
    guest._wait(lambda: bool(cond()), link, what, list, TIMEOUT)


def _session(guest: GuestClient) -> Any:
    ssn = guest.connection.session()
    ssn.open()
    return ssn


def _link(
    guest: GuestClient,
    address: str | None,
    name: str,
    *,
    sending: bool,
    ssn: Any = None,
    setup: Callable[[Link], None] | None = None,
) -> Link:
    """A link named ``name`` (on a session of its own unless ``ssn``), attached."""
    ssn = ssn or _session(guest)
    link = ssn.sender(name) if sending else ssn.receiver(name)
    (link.target if sending else link.source).address = address
    if setup is not None:
        setup(link)
    link.open()
    _until(guest, lambda: link.state & Endpoint.REMOTE_ACTIVE, f"attach of {name}", link)
    return link


def _inbox(guest: GuestClient, link: Link) -> list[tuple[Message, Delivery]]:
    """Whole messages the guest client has taken off ``link``: (message, delivery)."""
    return guest._tracker.inbox.setdefault(link.name, [])


def _take(guest: GuestClient, link: Link, count: int) -> list[tuple[Any, Delivery]]:
    """Wait for ``count`` messages on ``link`` (credit granted as needed) and take them off
    the inbox unsettled: (body, delivery); a binary body is copied out of its message."""
    inbox = _inbox(guest, link)
    if link.credit < count - len(inbox):
        link.flow(count - len(inbox) - link.credit)
    _until(guest, lambda: len(inbox) >= count, f"{count} messages", link)
    got, inbox[:] = inbox[:count], inbox[count:]
    return [(bytes(m.body) if isinstance(m.body, memoryview) else m.body, d) for m, d in got]


def _settle(deliveries: list[Delivery], state: int = Delivery.ACCEPTED) -> None:
    for dlv in deliveries:
        dlv.update(state)
        dlv.settle()


def _send(guest: GuestClient, snd: Link, bodies: list[Any]) -> list[Delivery]:
    """Send ``bodies`` at-least-once on ``snd`` and wait for every outcome (left unsettled)."""
    _until(guest, lambda: snd.credit >= len(bodies), "credit", snd)
    sent = [Message(body=b).send(snd) for b in bodies]
    _until(guest, lambda: all(d.remote_state for d in sent), "outcomes", snd)
    return sent


# ---- RabbitMQ: a session ended by the broker, next to sessions that carry on ---------------


def _every(cond: Callable[[], bool], period: float = 0.5) -> Callable[[], bool]:
    """``cond`` (a question to another process: it can only be polled) asked at most every
    ``period`` seconds, so that the guest's driver keeps running in between."""
    asked = [0.0]

    def polled() -> bool:
        if time.monotonic() - asked[0] < period:
            return False
        asked[0] = time.monotonic()
        return cond()

    return polled


def _rabbit_depth(rabbitmq: Any, queue: str) -> int:
    """Messages in a RabbitMQ queue, ready and unacknowledged."""
    rows = json.loads(rabbitmq.ctl("list_queues", "--formatter", "json", "name", "messages"))
    return next((r["messages"] for r in rows if r["name"] == queue.removeprefix("/queue/")), -1)


def test_rabbit_ending_one_session_leaves_the_guests_other_sessions_intact(
    rabbit: Routed,
) -> None:
    """RabbitMQ ends one session of a guest (here for a drain, as it does for modified and
    for a missing queue) while another session holds unsettled messages from the broker:
    that other session's deliveries can still be accepted (the broker drops them), its
    sender still works, the status counts what is left, and a new session, on the channel
    number the ended one freed, routes as before."""
    held_q, other_q, fresh_q = (f"/queue/{_name(s)}" for s in ("held", "drain", "fresh"))
    daemon = rabbit.daemon
    with rabbit.client("unix", _name("ssn")) as guest:
        frames: list[str] = []
        guest.driver.transport.trace(2)  # proton's frame trace: which channel each begin uses
        guest.driver.transport.tracer = lambda _t, line: frames.append(line)
        s1 = _session(guest)
        snd = _link(guest, held_q, "s1-send", sending=True, ssn=s1)
        _settle(_send(guest, snd, ["h0", "h1", "h2"]))
        rcv = _link(guest, held_q, "s1-recv", sending=False, ssn=s1)
        held = _take(guest, rcv, 3)
        assert [b for b, _ in held] == ["h0", "h1", "h2"]

        s2 = _session(guest)
        doomed = _link(guest, other_q, "s2-recv", sending=False, ssn=s2)
        doomed.drain(5)
        with pytest.raises(AmqpError) as ended:
            _until(guest, lambda: False, "the broker's end", doomed)
        assert ended.value.where == "session"
        s2.close()
        _until(guest, lambda: (frames and "-> @end" in frames[-1]) or False, "our end written")

        entry = wait_for(
            lambda: (e := daemon.channel("hr-unix"))["sessions"] == 1 and e,
            TIMEOUT,
            "the status to show the one session left",
        )
        assert entry["links"] == 2
        # The first session is untouched: its held deliveries settle at the broker.
        _settle([d for _, d in held])
        _settle(_send(guest, snd, ["after"]))
        ((body, dlv),) = _take(guest, rcv, 1)
        assert body == "after"
        _settle([dlv])
        _until(guest, _every(lambda: _rabbit_depth(rabbit.broker, held_q) == 0), "the acks")

        # A new session reuses the freed channel number and routes.
        s3 = _session(guest)
        fresh = _link(guest, fresh_q, "s3-send", sending=True, ssn=s3)
        assert [d.remote_state for d in _send(guest, fresh, ["x"])] == [Delivery.ACCEPTED]
        begins = [f.split()[0] for f in frames if "-> @begin" in f]
        assert len(begins) == 3 and begins[2] == begins[1], begins
        entry = daemon.channel("hr-unix")
        assert (entry["sessions"], entry["links"]) == (2, 3)
    assert _rabbit_depth(rabbit.broker, held_q) == 0


def test_rabbit_closing_a_guests_broker_side_connection_touches_only_that_guest(
    rabbit: Routed,
) -> None:
    """An administrator closes the broker-side connection behind one guest mid-stream (in
    RabbitMQ 3.10 an AMQP 1.0 connection's sessions run on an internal AMQP 0-9-1 direct
    connection, which ``rabbitmqctl`` can close): the guest's session ends with RabbitMQ's
    reason, the message it held unsettled stays on the queue, and the other guest, whose
    connection shares the daemon's one loop, carries on undisturbed."""
    queue = f"/queue/{_name('cut')}"
    other_q = f"/queue/{_name('bystander')}"
    daemon = rabbit.daemon
    victim = rabbit.client("unix", _name("victim"))
    try:
        with rabbit.client("pty", _name("bystander")) as bystander:
            assert bystander.send(other_q, ["before"])[0].state == "accepted"
            victim.send(queue, ["kept"])
            rcv = _link(victim, queue, "cut-r", sending=False)
            ((body, _),) = _take(victim, rcv, 1)  # held unsettled
            assert body == "kept"
            local = daemon.channel("hr-unix")["detail"]["upstream"]["local_address"]
            port = local.split(":")[-1]
            pids = {
                r["connection_id"]
                for r in rabbit.broker.list_connections()
                if r["remote_address"].endswith(f":{port}")
            }
            assert pids, rabbit.broker.list_connections()
            for pid in pids:  # "#PID<N.A.B>" as rabbitmqctl shows it; "<0.A.B>" on the node
                local_pid = "<0." + pid.split(".", 1)[1].rstrip(">") + ">"
                rabbit.broker.ctl(
                    "eval",
                    f'amqp_connection:close(list_to_pid("{local_pid}"), 320, <<"admin">>).',
                )
            with pytest.raises(AmqpError) as cut:
                _until(victim, lambda: False, "the close", rcv)
            # RabbitMQ 3.10 ends the guest's sessions, with its reason, not the connection.
            assert cut.value.where == "session" and cut.value.name == "amqp:internal-error"
            assert "app_initiated_close" in (cut.value.description or "")
            assert bystander.send(other_q, ["after"])[0].state == "accepted"
            assert [m.body for m in bystander.receive(other_q, 2)] == ["before", "after"]
    finally:
        victim.driver.close_fd()
        rabbit.channels["unix"].detach_fd()
    assert daemon.wait_state("hr-unix", "waiting")["last_error"] is None
    with rabbit.client("unix", _name("again")) as again:
        assert [m.body for m in again.receive(queue, 1)] == ["kept"]


# ---- Artemis: transactions through the connector -------------------------------------------


def _coordinator(guest: GuestClient) -> Link:
    def setup(link: Link) -> None:
        link.target.type = Terminus.COORDINATOR
        link.target.capabilities.put_object(symbol("amqp:local-transactions"))

    return _link(guest, None, f"txn-{uuid.uuid4().hex[:6]}", sending=True, setup=setup)


def _control(guest: GuestClient, coord: Link, descriptor: Any, fields: list[Any]) -> Delivery:
    _until(guest, lambda: coord.credit > 0, "coordinator credit", coord)
    dlv = Message(body=Described(descriptor, fields)).send(coord)
    _until(guest, lambda: dlv.remote_state, "the coordinator's outcome", coord)
    return dlv


def _declare(guest: GuestClient, coord: Link) -> bytes:
    dlv = _control(guest, coord, DECLARE, [None])
    assert dlv.remote_state == DECLARED, dlv.remote_state
    txn = dlv.remote.data[0]
    dlv.settle()
    return bytes(txn)


def _discharge(guest: GuestClient, coord: Link, txn: bytes, *, fail: bool) -> int:
    dlv = _control(guest, coord, DISCHARGE, [txn, fail])
    state = dlv.remote_state
    dlv.settle()
    return state


def _txn_send(guest: GuestClient, snd: Link, txn: bytes, bodies: list[str]) -> list[Delivery]:
    _until(guest, lambda: snd.credit >= len(bodies), "credit", snd)
    sent = []
    for body in bodies:
        dlv = Message(body=body).send(snd)
        dlv.local.data = [txn]
        dlv.update(TRANSACTIONAL_STATE)
        sent.append(dlv)
    _until(guest, lambda: all(d.remote_state for d in sent), "transactional outcomes", snd)
    return sent


def _txn_accept(dlv: Delivery, txn: bytes) -> None:
    dlv.local.data = [txn, Described(ulong(Delivery.ACCEPTED), [])]
    dlv.update(TRANSACTIONAL_STATE)
    dlv.settle()


def test_a_transaction_rolled_back_through_the_connector_undoes_sends_and_accepts(
    art: Routed,
) -> None:
    """A guest declares a transaction on the broker's coordinator, sends two messages and
    accepts one under it, then discharges with fail=true: the broker stores neither sent
    message and gives the accepted one back. A second transaction, committed, does both."""
    queue, source = _name("txn-out"), _name("txn-in")
    with art.client("unix", _name("txn")) as guest:
        guest.send(source, ["held"])
        coord = _coordinator(guest)
        snd = _link(guest, queue, "txn-s", sending=True)
        rcv = _link(guest, source, "txn-r", sending=False)
        txn = _declare(guest, coord)
        for dlv in _txn_send(guest, snd, txn, ["t1", "t2"]):
            assert dlv.remote_state == TRANSACTIONAL_STATE
            dlv.settle()
        ((body, dlv),) = _take(guest, rcv, 1)
        assert body == "held"
        _txn_accept(dlv, txn)
        assert _discharge(guest, coord, txn, fail=True) == Delivery.ACCEPTED
        # Rolled back: nothing was stored, and "held" is there again.
        assert guest.receive(queue, 1, drain=True) == []
        assert [m.body for m in guest.receive(source, 1, outcome="released")] == ["held"]

        txn = _declare(guest, coord)
        for dlv in _txn_send(guest, snd, txn, ["c1"]):
            dlv.settle()
        ((body, dlv),) = _take(guest, rcv, 1)
        _txn_accept(dlv, txn)
        assert _discharge(guest, coord, txn, fail=False) == Delivery.ACCEPTED
        assert [m.body for m in guest.receive(queue, 1)] == ["c1"]
        assert guest.receive(source, 1, drain=True) == []


def test_a_coordinator_detached_mid_transaction_rolls_it_back(art: Routed) -> None:
    """A guest closes its coordinator link with a transaction open (its agent crashed
    between declare and discharge): the broker rolls the transaction back, so what was
    sent under it is never stored, and the guest's connection goes on."""
    queue = _name("txn-orphan")
    with art.client("pty", _name("orphan")) as guest:
        coord = _coordinator(guest)
        snd = _link(guest, queue, "orphan-s", sending=True)
        txn = _declare(guest, coord)
        for dlv in _txn_send(guest, snd, txn, ["o1"]):
            dlv.settle()
        coord.close()
        _until(guest, lambda: coord.state & Endpoint.REMOTE_CLOSED, "the coordinator detach")
        assert guest.receive(queue, 1, drain=True) == []
        assert guest.send(queue, ["plain"])[0].state == "accepted"
        assert [m.body for m in guest.receive(queue, 1)] == ["plain"]


# ---- Artemis: filters, the relay's refusals ------------------------------------------------


def test_a_selector_filter_reaches_the_broker(art: Routed) -> None:
    """A receiver whose source carries a JMS selector gets only the matching messages; the
    others stay on the queue for a plain receiver."""
    queue = _name("selector")
    with art.client("unix", _name("sel")) as guest:
        msgs = [Message(body=c, properties={"colour": c}) for c in ("red", "blue", "red")]
        assert {o.state for o in guest.send(queue, msgs)} == {"accepted"}

        def setup(link: Link) -> None:
            selector = Described(SELECTOR_CODE, "colour = 'red'")
            link.source.filter.put_object({symbol("jms-selector"): selector})

        rcv = _link(guest, queue, "sel-r", sending=False, setup=setup)
        got = _take(guest, rcv, 2)
        assert [b for b, _ in got] == ["red", "red"]
        _settle([d for _, d in got])
        rcv.flow(1)
        assert guest.receive(queue, 1, drain=True)[0].body == "blue"
        assert _inbox(guest, rcv) == []


def test_the_anonymous_relay_refusing_a_missing_address_carries_the_brokers_error(
    art: Routed,
) -> None:
    """A message sent on the anonymous relay to an address the broker will not create is
    rejected with the broker's own condition, and the relay link goes on for the next."""
    good = _name("relay-ok")
    with art.client("pty", _name("relay")) as guest:
        missing = Message(address=f"{NO_AUTO_CREATE_PREFIX}{_name('gone')}", body="x")
        outcomes = guest.send(None, [missing, Message(address=good, body="y")])
        # Artemis answers "failed: AMQ119002: target address ... does not exist" directly.
        assert outcomes[0].state == "rejected"
        assert "does not exist" in (outcomes[0].description or ""), outcomes[0]
        assert outcomes[1].state == "accepted"
        assert [m.body for m in guest.receive(good, 1)] == ["y"]


# ---- pre-settled both ways under backpressure ----------------------------------------------

PRESETTLED = 3000


def test_presettled_both_ways_under_backpressure_loses_nothing(art: Routed) -> None:
    """At-most-once both ways: a guest sends 3000 pre-settled messages (more than the
    broker's 1000 credits at a time) and then receives them pre-settled a few credits at a
    time; on a healthy path at-most-once loses nothing and the counters count each once."""
    queue = _name("presettled")
    before = art.daemon.channel("ha-unix")
    with art.client("unix", _name("presettled")) as guest:
        bodies = [f"p{i}" for i in range(PRESETTLED)]
        guest.send(queue, bodies, settle="at-most-once")

        def setup(link: Link) -> None:
            link.snd_settle_mode = Link.SND_SETTLED

        rcv = _link(guest, queue, "pre-r", sending=False, setup=setup)
        got: list[Any] = []
        while len(got) < PRESETTLED:
            got += [b for b, _ in _take(guest, rcv, min(7, PRESETTLED - len(got)))]
        assert got == bodies
        assert rcv.remote_snd_settle_mode == Link.SND_SETTLED
    after = art.daemon.wait_state("ha-unix", "waiting")
    assert after["deliveries_in"] - before["deliveries_in"] == PRESETTLED
    assert after["deliveries_out"] - before["deliveries_out"] == PRESETTLED


# ---- many links on one session -------------------------------------------------------------


def test_max_links_on_one_session_all_route_and_one_more_ends_only_that_connection(
    art: Routed,
) -> None:
    """A guest attaches ``max_links`` (256) receivers on one session, at the attach rate the
    limits allow: each is routed and gets its one message; the link past the limit ends the
    guest's connection with ``amqp:resource-limit-exceeded`` and every message it held
    comes back to the queue."""
    limits = GuestLimits()
    queue = _name("links")
    with art.client("pty", _name("links-f")) as filler:
        filler.send(queue, [f"m{i}" for i in range(limits.max_links)])
    guest = art.client("unix", _name("links"))
    try:
        ssn = _session(guest)
        links: list[Link] = []
        started = time.monotonic()
        while len(links) < limits.max_links:
            # Stay under the token bucket: its burst, then attach_rate links a second.
            allowed = limits.attach_burst + (time.monotonic() - started) * limits.attach_rate
            batch = min(int(allowed) - len(links) - 1, 10, limits.max_links - len(links))
            if batch <= 0:
                _until(guest, lambda: True, "the next tick")
                continue
            for _ in range(batch):
                rcv = ssn.receiver(f"l{len(links)}")
                rcv.source.address = queue
                rcv.open()
                links.append(rcv)
            _until(
                guest,
                lambda: all(lk.state & Endpoint.REMOTE_ACTIVE for lk in links),
                "the attaches",
            )
        for rcv in links:
            rcv.flow(1)
        _until(guest, lambda: sum(len(_inbox(guest, lk)) for lk in links) == len(links), "all")
        assert all(len(_inbox(guest, lk)) == 1 for lk in links)
        entry = art.daemon.channel("ha-unix")
        assert (entry["sessions"], entry["links"]) == (1, limits.max_links)
        extra = ssn.receiver("one-too-many")
        extra.source.address = queue
        extra.open()
        with pytest.raises(AmqpError) as ended:
            _until(guest, lambda: False, "the close", extra)
        assert (ended.value.where, ended.value.name) == (
            "connection",
            "amqp:resource-limit-exceeded",
        )
    finally:
        guest.driver.close_fd()
        art.channels["unix"].detach_fd()
    entry = art.daemon.wait_state("ha-unix", "waiting")
    assert (entry["sessions"], entry["links"]) == (0, 0)
    with art.client("unix", _name("links-r")) as reader:
        got = reader.receive(queue, limits.max_links)
        assert sorted(m.body for m in got) == sorted(f"m{i}" for i in range(limits.max_links))


# ---- two guests on the one event loop ------------------------------------------------------

FLOOD_S = 2.0
FLOOD_BODY = b"\x5a" * (2 * 1024 * 1024)
# A round trip through the daemon and Artemis takes milliseconds; a starved guest would
# wait for the flood to end (seconds).
MAX_ROUND_TRIP_S = 1.0


def test_a_flooding_guest_does_not_starve_another_guests_request_response(
    art: Routed,
) -> None:
    """One guest sends 2 MB messages as fast as its credit allows while another does
    send-then-receive round trips: the daemon serves both on one loop, so the second
    guest's round trips stay short throughout the flood, and the flood is all accepted."""
    flood_q, rr_q = _name("flood"), _name("rr")
    stop = threading.Event()
    flooded: list[str] = []
    errors: list[BaseException] = []

    def flood() -> None:
        try:
            with art.client("unix", _name("flooder")) as flooder:
                while not stop.is_set():
                    flooded.extend(o.state for o in flooder.send(flood_q, [FLOOD_BODY] * 4))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=flood, daemon=True)
    trips: list[float] = []
    with art.client("pty", _name("rr")) as guest:
        guest.send(rr_q, ["warm-up"])
        guest.receive(rr_q, 1)
        base = art.daemon.channel("ha-unix")["bytes_in"]
        thread.start()
        try:
            # The flood has reached the daemon before the round trips are timed.
            flowing = _every(lambda: art.daemon.channel("ha-unix")["bytes_in"] > base)
            _until(guest, flowing, "the flood to flow")
            started = time.monotonic()
            while time.monotonic() - started < FLOOD_S:
                t0 = time.monotonic()
                assert guest.send(rr_q, [len(trips)])[0].state == "accepted"
                assert guest.receive(rr_q, 1)[0].body == len(trips)
                trips.append(time.monotonic() - t0)
        finally:
            stop.set()
            thread.join(TIMEOUT)
    assert not errors, errors
    assert flooded and set(flooded) == {"accepted"}
    assert art.daemon.channel("ha-unix")["bytes_in"] > base + 4 * len(FLOOD_BODY)
    assert max(trips) < MAX_ROUND_TRIP_S, (len(trips), max(trips))
    with art.client("unix", _name("flood-drain")) as reader:
        reader.receive(flood_q, len(flooded))


# ---- settlement orders ---------------------------------------------------------------------


def test_rcv_settle_mode_second_is_negotiated_end_to_end(art: Routed) -> None:
    """A guest sender asks for rcv-settle-mode second: it gets the broker's answer, not one
    made up by the connector, and its message is stored once whichever mode applies; in
    mode second the broker's outcome arrives unsettled and waits for the guest's settle."""
    queue = _name("second")
    with art.client("pty", _name("second")) as guest:

        def setup(link: Link) -> None:
            link.rcv_settle_mode = Link.RCV_SECOND

        snd = _link(guest, queue, "second-s", sending=True, setup=setup)
        mode = snd.remote_rcv_settle_mode
        (dlv,) = _send(guest, snd, ["s"])
        assert dlv.remote_state == Delivery.ACCEPTED
        if mode == Link.RCV_SECOND:
            assert not dlv.remote.settled
        dlv.settle()
        assert [m.body for m in guest.receive(queue, 1)] == ["s"]
