"""Answer a peer's flow echo, which proton 0.40's engine ignores.

A flow with ``echo`` set asks its receiver to send back its own flow state for that link
(AMQP 1.0 §2.7.4). Proton decodes neither the flag nor has a call that sends a flow for a
given link, so a proton-built router never answers. Each engine answers its own peer here,
on either side of the connector. The answer is the connector's end of the link, whose
credit the router keeps mirrored to the far end (``credit.py``), so what the guest hears is
the end-to-end state: never more credit than the broker granted.

How an answer gets out:

- Proton writes a flow for a session when the session needs one, and for each of its
  receiver links that has changed. Re-setting a session's incoming capacity to what it is
  marks the session so, and ``pn_link_flow(link, 0)`` marks a receiver link changed. For
  one of our receiver links that is the whole answer: proton writes the link's own state.
- For one of our sender links proton never writes a flow (except to end a drain), so the
  answer is built here and put into proton's output right after everything proton has
  written so far. Its session fields come from the flow proton has just written for the
  session; its link fields from proton's counters:

      link-credit    = pn_link_credit + pn_link_queued    (credit not yet used by a frame)
      delivery-count = the receiver's delivery-count + link-credit, from its last flow,
                       minus that link-credit

  Both hold only where every frame proton has produced is in sight (its output buffer is
  not full: ``engine.py``) and no drain is waiting to go out, so an answer waits for that.

Rare by nature (few clients set echo), so this favours plain code over speed; nothing here
runs unless a peer asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cproton_ffi import ffi, lib
from proton import uint

from .frames import (
    ECHO_FLOWS,
    EVERY_FLOW,
    FLOW,
    FLOW_HANDLE,
    TRANSFER,
    FrameReader,
    LinkKey,
    channel_of,
    decode,
    encode,
)

if TYPE_CHECKING:
    from .engine import Engine

_SEQUENCE = 0xFFFFFFFF  # delivery-count and credit are 32-bit serial numbers (RFC 1982)
_SESSION_FIELDS = 4  # next-incoming-id, incoming-window, next-outgoing-id, outgoing-window
_CLOSED = lib.PN_LOCAL_CLOSED | lib.PN_REMOTE_CLOSED


class EchoAnswers:
    """The echo answers one engine owes its peer."""

    __slots__ = ("due",)

    def __init__(self) -> None:
        # Our link (name, True for a receiver) -> for a sender link, the peer receiver's
        # credit limit (its delivery-count + link-credit, from its latest flow); None for
        # a receiver link, whose answer proton writes itself.
        self.due: dict[LinkKey, int | None] = {}

    def note_peer_flows(self, engine: Engine) -> None:
        """Take the flows the engine's reader found: echo requests, and the later flows of
        links with an answer due (they move the credit limit the answer is built from)."""
        reader = engine.reader
        for flow in reader.flows:
            peer_key = reader.links.by_where.get(flow.where)
            if peer_key is None:
                continue
            ours = (peer_key[0], not peer_key[1])  # the same link, from our end
            if flow.echo or ours in self.due:
                receiver = ours[1]
                limit = (flow.delivery_count + flow.link_credit) & _SEQUENCE
                self.due[ours] = None if receiver else limit
        reader.flows.clear()
        if reader.flows_skipped:
            # A flood of flows: some went unread, so the credit limit an answer for one of
            # our sender links would be built from may be stale. Those answers are dropped;
            # a receiver link's answer is proton's own and stays right.
            reader.flows_skipped = False
            self.due = {key: None for key, limit in self.due.items() if limit is None}
        self._watch(reader)

    def answer(self, engine: Engine) -> None:
        """Put out the answers that can go now (call before taking the engine's output)."""
        transport = engine.transport
        before = lib.pn_transport_pending(transport)
        if before < 0:
            self.due.clear()
            return
        if engine.output_hidden(before):
            return  # frames may hide behind a full buffer: not every one is in sight
        # Our frames so far, looked at first: they say which of our links are attached.
        engine.writer.scan(memoryview(_peek(transport, before)), lambda _n: None)
        ready = self._mark_ready(engine)
        if not ready:
            return
        total = lib.pn_transport_pending(transport)
        if total < 0 or engine.output_hidden(total):
            return  # try again when the output has drained
        frames: list[tuple[int, Any]] = []
        engine.writer.scan(memoryview(_peek(transport, total)), lambda _n: None, frames)
        written = [(at, frame) for at, frame in frames if at >= before]
        for key, link in ready:
            where = engine.writer.links.by_key.get(key)
            if where is None:
                continue  # our attach has not been seen yet; try again later
            if key[1]:
                if _flow_for(written, where) is not None:
                    del self.due[key]  # proton wrote the link's flow
                continue
            session = _session_flow(written, where[0])
            if session is None:
                continue
            engine.writer.insert(self._sender_flow(link, self.due.pop(key), session, where), total)
        self._watch(engine.reader)

    def _watch(self, reader: FrameReader) -> None:
        """Have the reader decode every flow while an answer is due, else only echo ones."""
        reader.stop = EVERY_FLOW if self.due else ECHO_FLOWS

    def _mark_ready(self, engine: Engine) -> list[tuple[LinkKey, Any]]:
        """Have proton write a flow for the session of each link whose answer can go now."""
        ready = []
        for key in list(self.due):
            link = _find_link(engine.connection, key)
            if link is None:
                del self.due[key]  # detached meanwhile: no answer is owed
                continue
            if not lib.pn_link_state(link) & lib.PN_LOCAL_ACTIVE:
                continue  # answered once our attach is out
            if key not in engine.writer.links.by_key:
                # Our detach is out (a detach without closing leaves the link active): no
                # answer is owed. Kept due, the session marked below made proton write a
                # session flow on every output, for as long as the peer did not answer.
                del self.due[key]
                continue
            if (
                not key[1]
                and lib.pn_link_get_drain(link)
                and lib.pn_link_credit(link) == 0
                and lib.pn_link_queued(link) > 0
            ):
                continue  # the end of a drain may be waiting behind these deliveries
            ssn = lib.pn_link_session(link)
            lib.pn_session_set_incoming_capacity(ssn, lib.pn_session_get_incoming_capacity(ssn))
            if key[1]:
                lib.pn_link_flow(link, 0)
            ready.append((key, link))
        return ready

    @staticmethod
    def _sender_flow(link: Any, limit: int | None, session: list[Any], where: Any) -> bytes:
        # Proton counts a delivery against our sender's credit once it is advanced; the
        # peer, at its first frame: a message still streaming is the peer's already.
        streaming = lib.pn_link_current(link) != ffi.NULL
        credit = max(0, lib.pn_link_credit(link) + lib.pn_link_queued(link) - streaming)
        fields = [
            *session,
            uint(where[1]),
            uint(((limit or 0) - credit) & _SEQUENCE),
            uint(credit),
            None,  # available: proton keeps no count of it
            bool(lib.pn_link_get_drain(link)),
        ]
        return encode(FLOW, where[0], fields)


def _peek(transport: Any, size: int) -> Any:
    """The first ``size`` bytes of the transport's pending output, left pending."""
    buf = ffi.new("char[]", size)
    lib.pn_transport_peek(transport, buf, size)
    return ffi.buffer(buf)


def _find_link(connection: Any, key: LinkKey) -> Any:
    """Our attached link with this name and role, or None."""
    name = key[0].encode()
    link = lib.pn_link_head(connection, 0)
    while link != ffi.NULL:
        if (
            bool(lib.pn_link_is_receiver(link)) == key[1]
            and not lib.pn_link_state(link) & _CLOSED
            and ffi.string(lib.pn_link_name(link)) == name
        ):
            return link
        link = lib.pn_link_next(link, 0)
    return None


def _fields(frame: bytes) -> list[Any]:
    decoded = decode(frame)
    return decoded[1] if decoded is not None else []


def _flow_for(written: list[tuple[int, Any]], where: Any) -> list[Any] | None:
    """The fields of a flow proton wrote for the link at ``where``, if it wrote one."""
    for _, frame in written:
        if isinstance(frame, bytes) and channel_of(frame) == where[0]:
            fields = _fields(frame)
            if len(fields) > FLOW_HANDLE and fields[FLOW_HANDLE] == where[1]:
                return fields
    return None


def _session_flow(written: list[tuple[int, Any]], channel: int) -> list[Any] | None:
    """The session fields of the last flow proton wrote on ``channel``, provided no
    transfer on that channel came after it (a transfer moves them)."""
    last = None
    for _, frame in written:
        if isinstance(frame, bytes):
            if channel_of(frame) == channel:
                last = frame
        elif frame == (TRANSFER, channel):
            last = None
    if last is None:
        return None
    fields = _fields(last)
    return (fields + [None] * _SESSION_FIELDS)[:_SESSION_FIELDS] if fields else None
