"""Reading a broker's redirect (``connector.redirect``): what makes a usable target, and the
URL it becomes. End to end, on a real Artemis and a scripted broker:
``tests/integration/test_upstream_redirect.py``."""

from __future__ import annotations

from typing import Any

import pytest
from proton import symbol, ushort

from connector.redirect import BadRedirect, Redirect, read_redirect
from connector.upstream import BrokerURL


def test_a_redirect_keeps_the_scheme_and_credentials_of_the_url_it_came_from() -> None:
    origin = BrokerURL.parse("amqps://user:secret@front.example:5671")
    target = read_redirect(
        {symbol("network-host"): "10.0.0.7", symbol("port"): ushort(5999)}, "amqps"
    )
    url = target.url(origin)
    assert url == BrokerURL("amqps", "10.0.0.7", 5999, "user", "secret")
    assert target.hostname is None


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({"network-host": "[::1]", "port": 5672}, Redirect("::1", 5672)),
        ({"network-host": "b.example", "port": "5673"}, Redirect("b.example", 5673)),
        (
            {"network-host": "b.example", "port": 5672, "hostname": "vhost", "scheme": "AMQP"},
            Redirect("b.example", 5672, "vhost"),
        ),
    ],
)
def test_usable_targets(info: dict[str, Any], expected: Redirect) -> None:
    assert read_redirect(info, "amqp") == expected


@pytest.mark.parametrize(
    ("info", "why"),
    [
        ({}, "no network-host"),
        ({"network-host": 7, "port": 5672}, "network-host 7 is not text"),
        ({"network-host": "", "port": 5672}, "network-host '' is not a host"),
        ({"network-host": "a\nb", "port": 5672}, "is not a host"),
        ({"network-host": "user@b.example", "port": 5672}, "is not a host"),
        ({"network-host": "b.example", "port": True}, "port True is not a port number"),
        ({"network-host": "b.example", "port": 70000}, "port 70000 is not a port number"),
        ({"network-host": "b.example", "port": 5672, "hostname": 3}, "hostname 3"),
        ({"network-host": "b.example", "port": 5672, "scheme": "amqp"}, "to scheme 'amqp'"),
    ],
)
def test_unusable_targets(info: dict[str, Any], why: str) -> None:
    with pytest.raises(BadRedirect, match=why.replace("(", r"\(")):
        read_redirect(info, "amqps")
