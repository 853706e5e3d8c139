"""Every unit test runs the router under ``FreedWatch``: a call on a session or link the
router has freed fails the test where it happens. Proton does not report such a use after
free; it reads whatever the memory holds by then, which a test would rarely see fail."""

from __future__ import annotations

import pytest

from connector.routing import router
from tests.support.routing import FreedWatch


@pytest.fixture(autouse=True)
def _freed_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router, "lib", FreedWatch(router.lib))
