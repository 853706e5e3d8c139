"""A use-after-free watch on the proton objects the routing core frees or settles.

Proton does not report a call on a session or link after ``pn_session_free`` or
``pn_link_free``, nor on a delivery after ``pn_delivery_settle`` ("a settled delivery can never
be used again"): it reads whatever the memory holds by then, which a test would rarely see
fail. ``install`` puts a ``FreedWatch`` in place of ``lib`` in every module of
``connector.routing``, and of each module-level alias of a ``lib`` function (the per-message
path keeps its functions in such aliases), so such a call fails where it happens.

Every test runs under it (tests/conftest.py), and so does every daemon that the tests
start (tests/support/watched_daemon.py), but not the benchmarks' daemon.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from cproton_ffi import lib

import connector.routing

# Calls that hand out a live object, perhaps at the address of one freed before (proton
# reuses memory, so an object handed out again is a new one): those given a connection or an
# event (or nothing), and those given an object that must itself be live.
_LIVE_FROM_PARENT = frozenset(
    {
        "pn_connection",
        "pn_event_session",
        "pn_event_link",
        "pn_event_delivery",
        "pn_session",
        "pn_session_head",
        "pn_link_head",
    }
)
_LIVE = _LIVE_FROM_PARENT | {
    "pn_session_next",
    "pn_sender",
    "pn_receiver",
    "pn_link_next",
    "pn_link_current",
    "pn_delivery",
}
# Of those, the calls that hand out a delivery.
_DELIVERY = frozenset({"pn_event_delivery", "pn_link_current", "pn_delivery"})
# Calls whose first argument must not be a freed object.
_WATCHED = ("pn_session_", "pn_link_", "pn_delivery_")
# Calls that free their first argument (and what it holds): a connection released frees
# its sessions and links.
_FREEING = frozenset(
    {"pn_connection_release", "pn_session_free", "pn_link_free", "pn_delivery_settle"}
)


class FreedWatch:
    """Stands in for ``lib``: fails a ``pn_session_*``, ``pn_link_*`` or ``pn_delivery_*``
    call on an object freed before (a session or link freed, or freed with its session or
    connection; a delivery settled, or settled by proton with its link)."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._freed: set[Any] = set()
        # Deliveries handed out and not settled, with their link: proton settles them when
        # it frees the link (the binding offers no pn_unsettled_head to ask it which).
        self._deliveries: dict[Any, Any] = {}
        self.violations: list[str] = []
        self._wrapped: dict[str, Callable[..., Any]] = {}

    def __getattr__(self, name: str) -> Any:
        wrapped = self._wrapped.get(name)
        if wrapped is None:
            wrapped = self._wrapped[name] = self._wrap(name, getattr(self._real, name))
        return wrapped

    def _wrap(self, name: str, fn: Any) -> Any:
        if name in _LIVE:
            delivery = name in _DELIVERY
            link_of = self._real.pn_delivery_link
            check = name not in _LIVE_FROM_PARENT

            def live(*args: Any) -> Any:
                if check:
                    self._check(name, args[0])
                made = fn(*args)
                self._freed.discard(made)
                if delivery and made:
                    self._deliveries[made] = link_of(made)
                return made

            return live
        if not callable(fn) or not (name.startswith(_WATCHED) or name in _FREEING):
            return fn
        freeing = name in _FREEING

        def call(obj: Any, *args: Any) -> Any:
            self._check(name, obj)
            if freeing:
                self._freed.update(self._held_by(name, obj))
            return fn(obj, *args)

        return call

    def _check(self, name: str, obj: Any) -> None:
        if obj in self._freed:
            why = f"{name} on a freed session, link or settled delivery"
            self.violations.append(why)
            raise AssertionError(why)

    def _held_by(self, name: str, obj: Any) -> list[Any]:
        """``obj`` and what proton frees or settles with it."""
        if name == "pn_delivery_settle":
            self._deliveries.pop(obj, None)
            return [obj]
        real = self._real
        sessions = []
        if name == "pn_link_free":
            links = [obj]
        elif name == "pn_session_free":
            links, link = [], real.pn_link_head(real.pn_session_connection(obj), 0)
            while link:
                if real.pn_link_session(link) == obj:
                    links.append(link)
                link = real.pn_link_next(link, 0)
        else:
            links, link = [], real.pn_link_head(obj, 0)
            while link:
                links.append(link)
                link = real.pn_link_next(link, 0)
            ssn = real.pn_session_head(obj, 0)
            while ssn:
                sessions.append(ssn)
                ssn = real.pn_session_next(ssn, 0)
        gone = set(links)  # proton settles a freed link's unsettled deliveries
        settled = [dlv for dlv, link in self._deliveries.items() if link in gone]
        for dlv in settled:
            del self._deliveries[dlv]
        return [obj, *sessions, *links, *settled]


def install(setattr_: Callable[[Any, str, Any], None]) -> FreedWatch:
    """Put one ``FreedWatch`` in every ``connector.routing`` module, through ``setattr_``
    (``monkeypatch.setattr`` in a test, so that it is undone after; plain ``setattr`` in a
    daemon). Returns the watch, whose ``violations`` say what it caught."""
    watch = FreedWatch(lib)
    for info in pkgutil.iter_modules(connector.routing.__path__):
        module = importlib.import_module(f"connector.routing.{info.name}")
        if getattr(module, "lib", None) is not lib:
            continue
        setattr_(module, "lib", watch)
        for attr, value in list(vars(module).items()):
            name = getattr(value, "__name__", "")
            if name.startswith("pn_") and getattr(lib, name, None) is value:
                setattr_(module, attr, getattr(watch, name))
    return watch
