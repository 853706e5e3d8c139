"""Per-guest address policy: rules by guest name, {guest} substitution, management denied."""

from __future__ import annotations

import pytest
from proton import Delivery, Message, uint

from connector.errors import ConfigError
from connector.policy import Policy
from connector.routing.route import AttachRequest
from tests.reliability.amqp import (
    AMQP_HEADER,
    ATTACH_DESCRIPTOR,
    DETACH,
    END,
    attach_frame,
    begin_frame,
    frame,
    open_frame,
    performative,
)
from tests.support.routing import Harness, attach, link_count, send_message


def _req(address: str | None, *, sending: bool = True, dynamic: bool = False) -> AttachRequest:
    return AttachRequest(address, sending, dynamic, coordinator=False)


POLICY = Policy.from_table(
    {
        "default": {"addresses": ["guests.{guest}.#", "shared.*"], "relay": False},
        "rule": [
            {"guests": "mgmt-*", "addresses": ["#", "qmf.default.direct"], "dynamic": False},
        ],
    }
)


@pytest.mark.parametrize(
    ("guest", "request_", "allowed"),
    [
        ("web1", _req("guests.web1.metrics"), True),
        ("web1", _req("guests.web2.metrics"), False),  # another guest's namespace
        ("web1", _req("shared.news"), True),
        ("web1", _req("shared.news.today"), False),  # '*' is one word
        ("web1", _req(None), False),  # anonymous relay off by default here
        ("web1", _req(None, sending=False, dynamic=True), True),
        ("web1", _req("qmf.default.direct"), False),
        ("web1", _req("activemq.management"), False),
        ("mgmt-1", _req("anything.at.all"), True),
        ("mgmt-1", _req("qmf.default.direct"), True),  # named literally
        ("mgmt-1", _req("$management"), False),  # '#' does not reach management
        ("mgmt-1", _req(None, sending=False, dynamic=True), False),
    ],
)
def test_rules(guest: str, request_: AttachRequest, allowed: bool) -> None:
    refusal = POLICY.check(guest, request_)
    assert (refusal is None) == allowed
    if refusal:
        assert refusal[0] == "amqp:unauthorized-access"
        assert guest in refusal[1]


def test_the_default_policy_allows_everything_but_management() -> None:
    policy = Policy()
    assert policy.check("vm", _req("orders")) is None
    assert policy.check("vm", _req(None)) is None
    assert policy.check("vm", _req("qmf.default.direct")) is not None


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ({"default": {"relay": "no"}}, "policy.default.relay"),
        ({"default": {"addresses": "guests.#"}}, "policy.default.addresses"),
        ({"rule": [{"guest": "x"}]}, "policy.rule[0].guest"),
        ({"rules": []}, "policy.rules"),
        ({"default": 5}, "policy.default"),
        ({"rule": 5}, "policy.rule"),
        ({"rule": [5]}, "policy.rule[0]"),
        ({"rule": [{"guests": 5}]}, "policy.rule[0].guests"),
    ],
)
def test_bad_policy_names_the_key(table: dict, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        Policy.from_table(table)
    assert err.value.where == where


def test_a_refused_attach_is_answered_and_detached_with_the_reason() -> None:
    h = Harness()
    h.router._policy = POLICY.for_guest("web1")
    _, snd = h.pipelined("peek", "guests.web2.secrets")
    assert snd.remote_condition.name == "amqp:unauthorized-access"
    assert "guests.web2.secrets" in snd.remote_condition.description
    assert not any(ev.type.name == "PN_LINK_REMOTE_OPEN" for ev in h.broker.events)
    assert any("refused attach" in line for line in h.log.lines)


@pytest.mark.parametrize("closing", [True, False], ids=["closed", "detached"])
def test_refused_links_are_freed_once_the_guest_answers(closing: bool) -> None:
    """A refused link is ours to free once the guest has answered its detach; kept, each
    refusal left a link object behind for the session's life, so a guest retrying a
    forbidden address on a long-lived session grew the connector without bound."""
    h = Harness()
    h.router._policy = POLICY.for_guest("web1")
    _, ssn = h.guest_session()
    for i in range(5):
        snd = attach(ssn, f"peek{i}", "guests.web2.secrets")
        h.pump()
        assert snd.remote_condition.name == "amqp:unauthorized-access"
        (snd.close if closing else snd.detach)()
        h.pump()
    assert link_count(h.router.guest.connection) == 0


@pytest.mark.parametrize("ending", ["session", "link"])
def test_a_refusal_waiting_for_the_brokers_open_goes_with_its_end(ending: str) -> None:
    """A refusal waits for our open, which waits for the broker's. A guest that ends the
    link's session meanwhile has the link freed with it; the refusal, still listed, then
    read that freed link at the open. (tests/conftest.py's FreedWatch fails the call.) A
    guest that detaches the link meanwhile is owed its attach and its detach, once: not a
    refusal on top of them."""
    h = Harness(guest=False, broker_answers_open=False)
    h.router._policy = POLICY.for_guest("web1")
    forbidden = attach_frame("peek", 0, sender=True, address="guests.web2.secrets")
    end = performative(END) if ending == "session" else performative(DETACH, uint(0), True)
    h.router.guest.push(AMQP_HEADER + open_frame() + begin_frame() + forbidden + frame(end))
    h.pump()
    h.broker.connection.open()
    h.pump()
    assert h.router.error is None
    assert not h.router._deferred_refusals
    if ending == "link":
        assert bytes(h.written).count(ATTACH_DESCRIPTOR) == 1
        assert link_count(h.router.guest.connection) == 0


def _relay_harness(policy: Policy, guest: str = "web1"):
    h = Harness()
    h.router._policy = policy.for_guest(guest)
    _, snd, brcv = h.sender("relay", None, credit=10)  # no target address: the anonymous relay
    return h, snd, brcv


def _relay(h: Harness, snd, to: str, tag: str):
    dlv = send_message(snd, tag, tag, to=to)
    h.pump()
    return dlv


def test_relayed_messages_are_checked_by_their_to() -> None:
    policy = Policy.from_table({"default": {"addresses": ["guests.{guest}.#"]}})
    h, snd, brcv = _relay_harness(policy)
    ok = _relay(h, snd, "guests.web1.metrics", "ok")
    bad = _relay(h, snd, "guests.web2.metrics", "bad")
    assert bad.remote_state == Delivery.REJECTED and bad.settled
    assert bad.remote.condition.name == "amqp:unauthorized-access"
    assert "guests.web2.metrics" in bad.remote.condition.description
    got = []
    while brcv.current is not None:
        msg = Message()
        msg.decode(brcv.recv(brcv.current.pending))
        got.append(msg.address)
        brcv.advance()
    assert got == ["guests.web1.metrics"]
    assert not ok.settled  # waits for the broker's outcome, as any delivery does
    assert snd.credit == 9  # the refused message's credit was given back


def test_a_prefix_gives_each_guest_its_own_namespace() -> None:
    policy = Policy.from_table({"default": {"prefix": "tenant.{guest}."}})
    h = Harness()
    h.router._policy = policy.for_guest("web1")
    _, rcv, blink = h.receiver("in", "orders")
    assert blink.remote_source.address == "tenant.web1.orders"
    assert rcv.remote_source.address == "orders"  # the guest sees its own name
    h2, snd, brcv = _relay_harness(policy)
    _relay(h2, snd, "events", "e1")
    msg = Message()
    msg.decode(brcv.recv(brcv.current.pending))
    assert msg.address == "tenant.web1.events" and msg.body == "e1"
