"""Artemis management over AMQP 1.0: who is connected, as the broker itself reports it.

Artemis answers management requests sent to the `activemq.management` address: application
properties `_AMQ_ResourceName` (here `broker`) and `_AMQ_OperationName`, the body a JSON array of
the operation's arguments, the reply sent to `reply-to` (a dynamic queue works). The reply's body
is a JSON array holding the result; `_AMQ_OperationSucceeded` says whether it is a result or an
error text. What each operation returns on 2.40 is recorded in docs/brokers.md.
"""

from __future__ import annotations

import json
from typing import Any

from proton import Message
from proton.utils import BlockingConnection

from tests.brokers.common import CLIENT_TIMEOUT, BrokerError

MANAGEMENT_ADDRESS = "activemq.management"
# The paged list operations want a page size; far more connections than any test opens.
PAGE_SIZE = 1000
# An empty filter: `listConnections` fails with a NullPointerException on `{}`, so every key the
# broker reads must be present, even empty.
NO_FILTER = json.dumps(
    {"field": "", "operation": "", "value": "", "sortOrder": "", "sortBy": "", "sortColumn": ""}
)


def artemis_call(
    conn: BlockingConnection, operation: str, *args: Any, resource: str = "broker"
) -> Any:
    """Invoke `operation` on management resource `resource` and return its decoded result."""
    receiver = conn.create_receiver(None, dynamic=True)
    sender = conn.create_sender(MANAGEMENT_ADDRESS)
    try:
        request = Message(
            body=json.dumps(list(args)),
            reply_to=receiver.link.remote_source.address,
            properties={"_AMQ_ResourceName": resource, "_AMQ_OperationName": operation},
        )
        sender.send(request)
        reply = receiver.receive(CLIENT_TIMEOUT)
        receiver.accept()
    finally:
        sender.close()
        receiver.close()
    result = json.loads(reply.body)[0]
    if not (reply.properties or {}).get("_AMQ_OperationSucceeded"):
        raise BrokerError(f"Artemis {resource}.{operation}{args!r} failed: {result}")
    return result


def artemis_connections(conn: BlockingConnection) -> list[dict[str, Any]]:
    """Every client connection except `conn` itself, from the paged `listConnections`.

    Artemis 2.40 reports the AMQP container-id as `clientID`, plus the remote socket address and
    the authenticated user; it keeps no trace of a client's open-frame properties, so
    `properties` is always None here (docs/brokers.md).
    """
    page = json.loads(artemis_call(conn, "listConnections", NO_FILTER, 1, PAGE_SIZE))
    own = conn.container.container_id
    return [
        {
            "container_id": row.get("clientID"),
            "properties": None,
            "remote_address": row.get("remoteAddress"),
            "user": row.get("users"),
            "protocol": row.get("protocol"),
            "connection_id": row.get("connectionID"),
            "sessions": row.get("sessionCount"),
            "raw": row,
        }
        for row in page["data"]
        if row.get("clientID") != own
    ]
