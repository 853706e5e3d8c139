"""Apache ActiveMQ Artemis: its connections through management over AMQP.

A message to ``activemq.management`` names the resource and operation in application
properties; its body is a JSON array of the operation's arguments, as a string. The reply's
body is a JSON array holding the result, itself JSON text, and ``_AMQ_OperationSucceeded``
says whether it worked. ``listConnections`` gives each connection's ``clientID`` (the AMQP
container-id) and ``remoteAddress``. Artemis does not show a client's open-frame
properties, so connections are matched by address and container-id only.
"""

from __future__ import annotations

import json
from typing import Any

from proton import Message

from connector.status.brokers.base import BrokerConnection, BrokerError, Conversation

MANAGEMENT_ADDRESS = "activemq.management"

# listConnections pages its answer. One page this large holds every connection a host's
# guests make (a few per guest), so a single request sees them all.
PAGE_SIZE = 10000

# The filter argument of the list operations: an empty filter lists everything.
NO_FILTER = json.dumps({"field": "", "operation": "", "value": ""})


def management_message(operation: str, *args: Any, resource: str = "broker") -> Message:
    """A management request for one operation of one resource."""
    return Message(
        properties={"_AMQ_ResourceName": resource, "_AMQ_OperationName": operation},
        body=json.dumps(list(args)),
    )


def operation_result(reply: Message) -> Any:
    """The decoded result of a management reply; raises BrokerError if it failed."""
    props = reply.properties or {}
    body = reply.body
    if not props.get("_AMQ_OperationSucceeded"):
        raise BrokerError(f"Artemis management refused the request: {body}")
    try:
        outer = json.loads(body) if isinstance(body, str) else body
        result = outer[0] if isinstance(outer, list) and outer else outer
        return json.loads(result) if isinstance(result, str) else result
    except (ValueError, TypeError) as exc:
        raise BrokerError(f"Artemis management answered something unexpected: {body!r}") from exc


def parse_connections(result: Any) -> list[BrokerConnection]:
    """The connections in a ``listConnections`` result ({"data": [...], "count": N})."""
    if not isinstance(result, dict) or not isinstance(result.get("data"), list):
        raise BrokerError("Artemis listConnections result has no data list")
    return [
        BrokerConnection(
            container_id=row.get("clientID") or None,
            remote_address=row.get("remoteAddress") or None,
        )
        for row in result["data"]
        if row.get("protocol", "AMQP") == "AMQP"
    ]


class ArtemisAdapter:
    """BrokerAdapter for Artemis."""

    name = "artemis"
    shows_properties = False

    def list_connections(self, conversation: Conversation) -> list[BrokerConnection]:
        """One listConnections call, unfiltered, one large page."""
        request = management_message("listConnections", NO_FILTER, 1, PAGE_SIZE)
        (reply,) = conversation.call(MANAGEMENT_ADDRESS, request)
        return parse_connections(operation_result(reply))
