"""qpidd (qpid-cpp): its connections through a QMFv2 query over AMQP 1.0.

qpid-python's QMF console does not install on Python 3, so the query is built by hand:
a map message to ``qmf.default.direct`` with subject ``broker`` asking for every object of
class ``connection``. qpidd answers with ``_query_response`` messages whose body is a list
of maps; it marks all but the last of a long answer with the ``partial`` property. Most
strings in the answer arrive as AMQP binary, and each object's ``remoteProperties`` holds
the client's open-frame properties plus its ``container-id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proton import Message

from connector.status.brokers.base import (
    BrokerConnection,
    BrokerError,
    Conversation,
    decode_strings,
)

QMF_ADDRESS = "qmf.default.direct"

QUERY_PROPERTIES = {
    "qmf.opcode": "_query_request",
    "x-amqp-0-10.app-id": "qmf2",
    "method": "request",
}
QUERY_BODY = {"_what": "OBJECT", "_schema_id": {"_class_name": "connection"}}


def query_message() -> Message:
    """The QMFv2 request for every connection object."""
    return Message(
        subject="broker",
        properties=dict(QUERY_PROPERTIES),
        body=dict(QUERY_BODY),
    )


def is_partial(reply: Message) -> bool:
    """True when qpidd says more response messages follow this one."""
    return "partial" in (reply.properties or {})


def parse_replies(replies: Sequence[Message]) -> list[BrokerConnection]:
    """The connections in a QMF query's response messages; raises BrokerError on an
    exception reply or a body that is not a QMF object list."""
    connections = []
    for reply in replies:
        props = decode_strings(dict(reply.properties or {}))
        opcode = props.get("qmf.opcode")
        if opcode == "_exception":
            text = decode_strings(reply.body)
            if isinstance(text, dict):
                text = text.get("_values", text).get("error_text", text)
            raise BrokerError(f"qpidd refused the QMF query: {text}")
        if opcode != "_query_response":
            raise BrokerError(f"qpidd answered the QMF query with opcode {opcode!r}")
        body = decode_strings(reply.body)
        if not isinstance(body, list):
            raise BrokerError("qpidd's QMF query response is not a list of objects")
        connections.extend(connection_from_object(obj) for obj in body)
    return connections


def connection_from_object(obj: Any) -> BrokerConnection:
    """One QMF connection object (already string-decoded) as a BrokerConnection."""
    values = obj.get("_values", {}) if isinstance(obj, dict) else {}
    properties = dict(values.get("remoteProperties") or {})
    container_id = properties.pop("container-id", None)
    return BrokerConnection(
        container_id=container_id,
        remote_address=client_address(values.get("address")),
        properties=properties,
    )


def client_address(address: Any) -> str | None:
    """The client's end of a qpidd connection address ``BROKER-CLIENT``
    (``127.0.0.1:5672-127.0.0.1:40112`` gives ``127.0.0.1:40112``)."""
    if not isinstance(address, str) or "-" not in address:
        return None
    return address.rsplit("-", 1)[1]


class QpiddAdapter:
    """BrokerAdapter for qpidd."""

    name = "qpidd"
    shows_properties = True

    def list_connections(self, conversation: Conversation) -> list[BrokerConnection]:
        """Run the QMF connection query and parse every response message."""
        return parse_replies(conversation.call(QMF_ADDRESS, query_message(), more=is_partial))
