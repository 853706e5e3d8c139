"""The use-after-free watch itself (tests/support/freed.py), which every test runs under
(tests/conftest.py) and every daemon the tests start: it must see a call on a freed object from
any routing module, through ``lib`` or through a module's alias of a ``lib`` function."""

from __future__ import annotations

from typing import Any

import pytest

from connector.routing import credit, deliveries, router
from tests.support.freed import FreedWatch
from tests.support.routing import Harness, send_message


def _unsettled_message() -> tuple[Harness, Any, Any]:
    """A message the guest sent, routed, that the broker has not settled: the harness (which
    the test must hold: its engines own the proton objects), the guest-side delivery and its
    upstream twin."""
    h = Harness()
    h.open_guest()
    _, snd, _ = h.sender("s", "q", credit=1)
    send_message(snd, "t1", "hello")
    h.pump()
    (route,) = [r for r in h.router.routes.values() if r.from_guest]
    ((dlv, twin),) = route.inflight.items()
    return h, dlv, twin


def test_every_routing_module_shares_the_watch() -> None:
    watch = router.lib
    assert isinstance(watch, FreedWatch)
    assert credit.lib is watch and deliveries.lib is watch
    # the per-message path's aliases go through it too
    assert deliveries._settled.__qualname__.startswith("FreedWatch")


def test_a_call_on_a_settled_delivery_fails_through_an_alias() -> None:
    _h, _dlv, twin = _unsettled_message()
    router.lib.pn_delivery_settle(twin)
    with pytest.raises(AssertionError, match="pn_delivery_settled on a freed"):
        deliveries._settled(twin)
    assert router.lib.violations == [
        "pn_delivery_settled on a freed session, link or settled delivery"
    ]


def test_freeing_a_link_frees_its_unsettled_deliveries() -> None:
    _h, dlv, twin = _unsettled_message()
    link = router.lib.pn_delivery_link(twin)
    router.lib.pn_link_free(link)
    with pytest.raises(AssertionError):
        credit.lib.pn_link_credit(link)
    with pytest.raises(AssertionError):
        deliveries._remote_state(twin)
    assert not deliveries._settled(dlv)  # the guest's side is another link: still live


def test_freeing_a_session_frees_its_links() -> None:
    _h, dlv, _twin = _unsettled_message()
    glink = router.lib.pn_delivery_link(dlv)
    router.lib.pn_session_free(router.lib.pn_link_session(glink))
    with pytest.raises(AssertionError):
        deliveries._current(glink)
    with pytest.raises(AssertionError):
        deliveries._settled(dlv)


def test_releasing_a_connection_frees_its_sessions_and_links() -> None:
    h, dlv, _twin = _unsettled_message()
    glink = router.lib.pn_delivery_link(dlv)
    h.router.guest.free()
    with pytest.raises(AssertionError):
        credit.lib.pn_link_credit(glink)
    with pytest.raises(AssertionError):
        deliveries._settled(dlv)
