"""The control protocol's pure parts: row keys, views, and the reply to every request."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
from pathlib import Path

import pytest

from connector.control import protocol
from connector.control.sample import sample_snapshot

NOW = 1_800_000_000.0

# The issue-2 contract, spelled out here again on purpose: if protocol.ROW_KEYS changes,
# this test fails and whoever changed it must also change docs/status.md and scripts.
DOCUMENTED_ROW_KEYS = [
    "guest", "port", "kind", "path", "state", "since", "upstream", "sessions", "links",
    "deliveries_in", "deliveries_out", "bytes_in", "bytes_out", "discarded_bytes",
    "last_error",
]  # fmt: skip


def test_channel_rows_have_exactly_the_documented_keys_sorted_by_guest() -> None:
    rows = protocol.channel_rows(sample_snapshot(NOW))
    assert [list(r) for r in rows] == [DOCUMENTED_ROW_KEYS] * 4
    assert [r["guest"] for r in rows] == ["batch", "db", "old", "web1"]
    json.dumps(rows)  # JSON-ready, nothing exotic inside


def test_sample_counters_add_up_from_links() -> None:
    web1 = next(c for c in sample_snapshot(NOW)["channels"] if c["guest"] == "web1")
    assert web1["deliveries_in"] == 1500 and web1["bytes_in"] == 1536000
    assert web1["deliveries_out"] == 1498 and web1["links"] == 2 and web1["sessions"] == 1


def test_guest_view_prefers_an_identity_that_knows_pid_and_uuid() -> None:
    snap = sample_snapshot(NOW)
    web1 = next(c for c in snap["channels"] if c["guest"] == "web1")
    bare = json.loads(json.dumps(web1))
    bare["path"] = "/run/qpid-virtio/web1-b.sock"
    bare["port"] = "org.qpid.amqp.1"
    bare["detail"]["identity"].update(uuid=None, pid=None, found_by="watch")
    snap["channels"].insert(0, bare)
    view = protocol.guest_view(snap, "web1")
    assert view is not None
    assert (view["pid"], view["found_by"]) == (3101, "config")
    assert [c["port"] for c in view["channels"]] == ["org.qpid.amqp.0", "org.qpid.amqp.1"]
    assert protocol.guest_view(snap, "nobody") is None


def test_link_views_name_their_channel() -> None:
    links = protocol.link_views(sample_snapshot(NOW))
    assert [(lk["guest"], lk["direction"], lk["address"]) for lk in links] == [
        ("web1", "out", "replies.web1"),
        ("web1", "in", "orders"),
    ]
    assert links[0]["path"] == "/run/qpid-virtio/web1.sock"


def test_answer_each_command() -> None:
    snap = sample_snapshot(NOW)
    reply = protocol.answer({"command": "channels"}, snap)
    assert reply["ok"] is True and reply["version"] == protocol.PROTOCOL_VERSION
    assert len(reply["channels"]) == 4 and "detail" not in reply["channels"][0]
    assert protocol.answer({"command": "guest", "name": "db"}, snap)["guest"]["name"] == "db"
    assert len(protocol.answer({"command": "links"}, snap)["links"]) == 2
    assert protocol.answer({"command": "snapshot"}, snap)["snapshot"] is snap


def test_answer_errors_are_replies_not_exceptions() -> None:
    snap = sample_snapshot(NOW)
    cases = {
        "[1, 2]": "must be a JSON object",
        '{"command": "reboot"}': "unknown command 'reboot'",
        "{}": "unknown command None",
        '{"command": "guest"}': "'name' must be a non-empty string",
        '{"command": "guest", "name": "ghost"}': "no guest named 'ghost'",
    }
    for request, message in cases.items():
        reply = protocol.answer(json.loads(request), snap)
        assert reply["ok"] is False, request
        assert message in reply["error"], (request, reply)
        assert reply["version"] == protocol.PROTOCOL_VERSION


def documented_keys(heading: str) -> list[str]:
    """The backticked keys in the first column of the table under a docs/status.md heading."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "status.md").read_text()
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    keys: list[str] = []
    for line in section.splitlines():
        if line.startswith("| `"):
            keys += re.findall(r"`([a-z_]+)`", line.split("|")[1])
    return keys


def test_docs_list_exactly_the_row_and_detail_keys() -> None:
    assert documented_keys("### Channel row") == DOCUMENTED_ROW_KEYS
    detail = sample_snapshot(NOW)["channels"][0]["detail"]
    assert documented_keys("### `guest NAME --json`") == list(detail)
    assert list(detail) == list(protocol.ChannelDetail.__annotations__)


def test_the_socket_path_limit_is_the_one_sockets_have(tmp_path: Path) -> None:
    """A path of MAX_SOCKET_PATH_BYTES binds; one byte more is named too long, in bytes."""
    room = protocol.MAX_SOCKET_PATH_BYTES - len(os.fsencode(tmp_path)) - 1
    if room < 1:
        pytest.skip(f"the temporary directory's path is too long: {tmp_path}")
    longest = str(tmp_path / ("x" * room))
    assert protocol.socket_path_problem(longest) is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(longest)
    over = protocol.MAX_SOCKET_PATH_BYTES + 1
    assert protocol.socket_path_problem(longest + "x") == (
        f"the path is too long for a unix socket ({over} bytes; at most "
        f"{protocol.MAX_SOCKET_PATH_BYTES})"
    )
    assert protocol.socket_path_problem("/" + "é" * 60) is not None  # 121 bytes, 61 characters


def test_a_socket_error_always_has_a_reason() -> None:
    long_path = "/" + "x" * 200
    assert protocol.socket_error_text("/s", OSError(errno.EACCES, "Permission denied")) == (
        "Permission denied"
    )
    # what Python raises itself: no errno, no strerror
    assert "too long for a unix socket" in protocol.socket_error_text(
        long_path, OSError("AF_UNIX path too long")
    )
    assert protocol.socket_error_text("/s", OSError("something odd")) == "something odd"
