"""A base for the small proton brokers that tests run themselves (in a thread or a process
of their own), where a real broker would not show what the test checks."""

from __future__ import annotations

from typing import Any

from proton.handlers import MessagingHandler


class AddressEchoingHandler(MessagingHandler):
    """Answers each attach with the address the client asked for, on the terminus it named.

    Proton answers an attach with termini that name no address unless its handler sets
    them, where Artemis and RabbitMQ answer with the address attached to; a test broker
    that stands in for them answers the same way, so that what the guest sees through the
    connector does not depend on which broker is behind it."""

    def on_link_opening(self, event: Any) -> None:
        link = event.link
        if link.remote_target and link.remote_target.address:
            link.target.address = link.remote_target.address
        if link.remote_source and link.remote_source.address:
            link.source.address = link.remote_source.address
