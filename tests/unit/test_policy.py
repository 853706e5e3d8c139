"""Per-guest address policy: rules by guest name, {guest} substitution, management denied."""

from __future__ import annotations

import pytest

from connector.errors import ConfigError
from connector.policy import Policy
from connector.routing.route import AttachRequest
from tests.support.routing import Harness


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
    ],
)
def test_bad_policy_names_the_key(table: dict, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        Policy.from_table(table)
    assert err.value.where == where


def test_a_refused_attach_is_answered_and_detached_with_the_reason() -> None:
    h = Harness()
    h.router._check_attach = lambda req: POLICY.check("web1", req)
    # Open, begin and attach in one go, as proton clients write them.
    conn = h.guest.connection
    conn.open()
    ssn = conn.session()
    ssn.open()
    snd = ssn.sender("peek")
    snd.target.address = "guests.web2.secrets"
    snd.open()
    h.pump()
    assert snd.remote_condition.name == "amqp:unauthorized-access"
    assert "guests.web2.secrets" in snd.remote_condition.description
    assert not any(ev.type.name == "PN_LINK_REMOTE_OPEN" for ev in h.broker.events)
    assert any("refused attach" in line for line in h.log.lines)
