"""Broker host names resolved off the event loop.

``getaddrinfo`` blocks, and nothing bounds how long: a resolver that does not answer holds
the caller for its whole timeout and retries (seconds, each time). On the daemon's one loop
that would stall every guest's heartbeats and traffic whenever any guest connects to a
broker named by a host name: a configured one, or a redirect's target, which the broker
chooses. So a name is resolved in a thread, and the loop awaits the answer.

One lookup per name is in flight at a time, shared by every connect that needs it, so a
resolver that hangs costs one thread per broker name, not one per guest. The threads are
daemon threads: a lookup that never returns does not hold the daemon's exit. An address
written as one (``127.0.0.1``, ``::1``) needs no lookup and is resolved at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import threading
import weakref

from .upstream import Address, BrokerURL, broker_addresses

_Key = tuple[str, int]


class Resolver:
    """The lookups in flight on one event loop; ``for_loop`` gives the loop's one."""

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Resolver] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: ``_by_loop`` maps the loop to this, and a strong reference back would
        # keep every loop that ever resolved a name alive.
        self._loop = weakref.ref(loop)
        self._inflight: dict[_Key, asyncio.Future[list[Address]]] = {}

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop) -> Resolver:
        """The resolver every channel on ``loop`` shares."""
        resolver = cls._by_loop.get(loop)
        if resolver is None:
            resolver = cls._by_loop[loop] = cls(loop)
        return resolver

    @staticmethod
    def is_address(host: str) -> bool:
        """Whether ``host`` is an address already, which needs no lookup."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True

    async def addresses(self, url: BrokerURL) -> list[Address]:
        """The broker's addresses, as ``broker_addresses`` gives them (OSError when the
        name does not resolve). The list is the caller's own: a connect uses it up."""
        key = (url.host, url.port)
        future = self._inflight.get(key)
        if future is None:
            future = self._inflight[key] = asyncio.get_running_loop().create_future()
            lookup = threading.Thread(
                target=self._lookup, args=(url, key, future), name=f"resolve {url.host}"
            )
            lookup.daemon = True  # a lookup that never returns must not hold the exit
            lookup.start()
        # Shielded: a connect that gives up must not cancel the lookup others await.
        return list(await asyncio.shield(future))

    def _lookup(self, url: BrokerURL, key: _Key, future: asyncio.Future[list[Address]]) -> None:
        """In the lookup's thread: resolve, then hand the answer to the loop."""
        try:
            answer: list[Address] | OSError = broker_addresses(url)
        except OSError as err:
            answer = err
        except Exception as err:  # UnicodeError: a name IDNA cannot encode ("broker..example")
            answer = OSError(errno.EINVAL, f"{url.host!r} cannot be looked up: {err}")
        # Gone, or closed (RuntimeError), while the lookup hung: nobody awaits it.
        loop = self._loop()
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._done, key, future, answer)

    def _done(
        self, key: _Key, future: asyncio.Future[list[Address]], answer: list[Address] | OSError
    ) -> None:
        if self._inflight.get(key) is future:
            del self._inflight[key]
        if future.done():
            return
        if isinstance(answer, OSError):
            future.set_exception(answer)
            future.exception()  # retrieved: a lookup nobody awaits any more is not an error
        else:
            future.set_result(answer)
