"""The Artemis adapter of --broker-check against a real Artemis, without the daemon.

A proton client stands in for an upstream connection; the cross-check must find it by
container-id while it is open and report the guest missing once it has closed.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from proton.utils import BlockingConnection

from connector.control.protocol import sorted_channels
from connector.control.sample import sample_snapshot
from connector.status.brokers.base import Conversation
from connector.status.brokers.registry import check_broker, detect

pytestmark = pytest.mark.broker

WEB1 = "/run/qpid-virtio/web1.sock"
# How long Artemis may keep listing a connection after it closed; it is usually immediate.
FORGET_TIMEOUT = 10.0


def test_artemis_is_detected_and_lists_a_connection_by_container_id(artemis: Any) -> None:
    with Conversation(artemis.url) as conversation:
        assert detect(conversation).name == "artemis"
    channels = sorted_channels(sample_snapshot())
    for entry in channels:
        entry["detail"]["upstream"]["local_address"] = None  # match on container-id alone
    upstream = BlockingConnection(
        artemis.url, container_id="web1-app", properties={"qpid-virtio.guest": "web1"}
    )
    try:
        result = check_broker(artemis.url, channels)
    finally:
        upstream.close()
    assert result["adapter"] == "artemis" and result["shows_properties"] is False
    assert result["matched"] == [WEB1] and result["missing_on_broker"] == []
    # Artemis may drop a closed connection from its list a moment after the close exchange;
    # no event says when, so poll with a deadline.
    deadline = time.monotonic() + FORGET_TIMEOUT
    while True:
        after = check_broker(artemis.url, channels, broker_type="artemis")
        if after["missing_on_broker"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [m["path"] for m in after["missing_on_broker"]] == [WEB1]
