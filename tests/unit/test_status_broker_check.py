"""--broker-check: the qpidd adapter on recorded QMF replies and against a scripted proton
peer that answers like qpidd, the Artemis reply parser, and the broker-neutral cross-check."""

from __future__ import annotations

import base64
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from proton import Message, symbol
from proton.handlers import MessagingHandler
from proton.reactor import ApplicationEvent, Container, EventInjector

from connector.control.protocol import ChannelEntry, sorted_channels
from connector.control.sample import ServedState, sample_snapshot
from connector.status import cli
from connector.status.brokers import artemis, qpidd
from connector.status.brokers.base import BrokerConnection, BrokerError, cross_check
from connector.status.brokers.registry import check_broker

DATA = Path(__file__).parent / "data" / "qmf_connections.json"
RECORDED = json.loads(DATA.read_text())

# What Artemis 2.40 answered to listConnections on this machine (one AMQP client).
ARTEMIS_REPLY_BODY = (
    '["{\\"data\\":[{\\"connectionID\\":\\"42badb7c\\",\\"remoteAddress\\":\\"127.0.0.1:40112\\",'
    '\\"users\\":\\"\\",\\"creationTime\\":\\"Fri Nov 27 00:32:06 UTC 2026\\",'
    '\\"implementation\\":\\"ActiveMQProtonRemotingConnection\\",\\"protocol\\":\\"AMQP\\",'
    '\\"clientID\\":\\"web1-app\\",\\"localAddress\\":\\"tcp:///127.0.0.1:35672\\",'
    '\\"sessionCount\\":1}],\\"count\\":1}"]'
)


def decoded(messages: list[str]) -> list[Message]:
    out = []
    for encoded in messages:
        msg = Message()
        msg.decode(base64.b64decode(encoded))
        out.append(msg)
    return out


def channels() -> list[ChannelEntry]:
    return sorted_channels(sample_snapshot())


def test_recorded_qmf_query_response_parses_with_binary_strings_decoded() -> None:
    replies = decoded(RECORDED["query_response"])
    assert [qpidd.is_partial(r) for r in replies] == [True, False]
    conns = qpidd.parse_replies(replies)
    assert [c.container_id for c in conns] == [
        "web1-app", "intruder-app", "qpid-virtio-status-7c1e", "db-app",
    ]  # fmt: skip
    web1 = conns[0]
    assert web1.remote_address == "127.0.0.1:40112"
    assert web1.guest == "web1"
    assert web1.properties["qpid-virtio.channel"] == "/run/qpid-virtio/web1.sock"
    assert "container-id" not in web1.properties
    assert conns[2].guest is None


def test_recorded_qmf_exception_is_a_broker_error() -> None:
    with pytest.raises(BrokerError, match="unauthorized-access: anonymous@QPID may not query"):
        qpidd.parse_replies(decoded(RECORDED["exception"]))


def test_the_query_is_the_documented_qmf_request() -> None:
    msg = qpidd.query_message()
    assert msg.subject == "broker"
    assert msg.properties == {
        "qmf.opcode": "_query_request", "x-amqp-0-10.app-id": "qmf2", "method": "request",
    }  # fmt: skip
    assert msg.body == {"_what": "OBJECT", "_schema_id": {"_class_name": "connection"}}


def test_cross_check_on_the_recorded_answer() -> None:
    conns = qpidd.parse_replies(decoded(RECORDED["query_response"]))
    result = cross_check(channels(), conns, "amqp://q", qpidd.QpiddAdapter())
    assert result["matched"] == ["/run/qpid-virtio/web1.sock"]
    assert result["missing_on_broker"] == []
    # intruder is unknown; db is known but not connected, so the broker's db is unknown too
    assert [u["guest"] for u in result["unknown_to_connector"]] == ["intruder", "db"]
    assert result["unknown_to_connector"][0] == {
        "guest": "intruder", "port": "org.qpid.amqp.0",
        "channel": "/run/qpid-virtio/intruder.sock", "container_id": "intruder-app",
        "remote_address": "127.0.0.1:40770",
    }  # fmt: skip


def test_cross_check_marks_a_connected_guest_the_broker_does_not_list() -> None:
    result = cross_check(channels(), [], "amqp://q", qpidd.QpiddAdapter())
    assert result["matched"] == []
    assert result["missing_on_broker"] == [
        {"guest": "web1", "port": "org.qpid.amqp.0", "path": "/run/qpid-virtio/web1.sock",
         "container_id": "web1-app"},
    ]  # fmt: skip


def test_cross_check_by_address_or_container_id_when_properties_are_hidden() -> None:
    adapter = artemis.ArtemisAdapter()
    by_address = [BrokerConnection(container_id="other", remote_address="127.0.0.1:40112")]
    assert cross_check(channels(), by_address, "u", adapter)["matched"] == [
        "/run/qpid-virtio/web1.sock"
    ]
    by_container = [BrokerConnection(container_id="web1-app", remote_address="10.0.0.1:1")]
    assert cross_check(channels(), by_container, "u", adapter)["matched"] == [
        "/run/qpid-virtio/web1.sock"
    ]
    # a broker that shows properties must not match on container-id alone: a guest's
    # container-id is the guest's own choice, the properties are the host's
    assert cross_check(channels(), by_container, "u", qpidd.QpiddAdapter())["matched"] == []


def test_artemis_reply_parses() -> None:
    reply = Message(properties={"_AMQ_OperationSucceeded": True}, body=ARTEMIS_REPLY_BODY)
    conns = artemis.parse_connections(artemis.operation_result(reply))
    assert conns == [BrokerConnection(container_id="web1-app", remote_address="127.0.0.1:40112")]
    refused = Message(properties={"_AMQ_OperationSucceeded": False}, body='["AMQ229031: no"]')
    with pytest.raises(BrokerError, match="refused the request"):
        artemis.operation_result(refused)


class FakeQpidd(MessagingHandler):
    """A proton peer that answers the QMF connection query with the recorded replies."""

    def __init__(self, port: int, replies: list[Message]) -> None:
        super().__init__()
        self.port = port
        self.replies = replies
        self.requests: list[Message] = []
        self.ready = threading.Event()
        self.reply_links: dict[str, Any] = {}

    def on_start(self, event: Any) -> None:
        self.container = event.container
        self.acceptor = event.container.listen(f"127.0.0.1:{self.port}")
        self.ready.set()

    def on_connection_opening(self, event: Any) -> None:
        event.connection.properties = {symbol("product"): "qpid-cpp", symbol("version"): "1.40"}

    def on_link_opening(self, event: Any) -> None:
        link = event.link
        if link.is_sender and link.remote_source.dynamic:
            address = f"reply-{uuid.uuid4()}"
            link.source.address = address
            self.reply_links[address] = link
        elif link.is_receiver:
            link.target.address = link.remote_target.address
        link.open()

    def on_finish(self, event: Any) -> None:
        self.acceptor.close()
        self.container.stop()

    def on_message(self, event: Any) -> None:
        request = event.message
        self.requests.append(request)
        sender = self.reply_links[request.reply_to]
        for reply in self.replies:
            reply.correlation_id = request.correlation_id
            sender.send(reply)


@pytest.fixture
def fake_qpidd() -> Iterator[FakeQpidd]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    handler = FakeQpidd(port, decoded(RECORDED["query_response"]))
    container = Container(handler)
    injector = EventInjector()  # the thread-safe way into the container's loop
    container.selectable(injector)
    thread = threading.Thread(target=container.run, daemon=True)
    thread.start()
    assert handler.ready.wait(10)
    yield handler
    injector.trigger(ApplicationEvent("finish"))
    thread.join(10)
    assert not thread.is_alive()


def test_check_broker_against_a_scripted_qpidd_peer(fake_qpidd: FakeQpidd) -> None:
    url = f"amqp://127.0.0.1:{fake_qpidd.port}"
    result = check_broker(url, channels())  # auto: the peer says product qpid-cpp
    assert result["adapter"] == "qpidd"
    assert result["matched"] == ["/run/qpid-virtio/web1.sock"]
    assert [u["guest"] for u in result["unknown_to_connector"]] == ["intruder", "db"]
    (request,) = fake_qpidd.requests
    assert request.address == "qmf.default.direct" and request.subject == "broker"
    assert request.properties["qmf.opcode"] == "_query_request"
    assert request.body == qpidd.QUERY_BODY
    assert request.reply_to.startswith("reply-")


def test_cli_broker_check_marks_both_sides(
    fake_qpidd: FakeQpidd, tmp_path: Path, capsys: Any
) -> None:
    snap = sample_snapshot()
    url = f"amqp://127.0.0.1:{fake_qpidd.port}"
    snap["connector"]["upstream_urls"] = [url]  # the default broker is the upstream's
    second = json.loads(json.dumps(snap["channels"][0]))
    second.update(guest="app2", path="/run/qpid-virtio/app2.sock")
    second["detail"]["upstream"].update(container_id="app2", local_address="127.0.0.1:9")
    snap["channels"].append(second)
    with ServedState(str(tmp_path / "c.sock"), snap) as served:
        status = cli.main(["--control-socket", served.control.path, "--broker-check"])
        out = capsys.readouterr().out
        assert status == cli.EXIT_UNHEALTHY
        rows = {line.split()[0]: line for line in out.splitlines()[1:6]}
        assert "  listed  " in rows["web1"] and "  MISSING  " in rows["app2"]
        assert f"broker check against {url} (qpidd): 1 listed, 1 missing, 2 unknown" in out
        assert "MISSING on broker: guest app2 port org.qpid.amqp.0 (/run/qpid-virtio/app2" in out
        assert (
            "UNKNOWN to connector: broker connection from 127.0.0.1:40770 claims guest intruder"
            in out
        )
        cli.main(["--control-socket", served.control.path, "--broker-check", "--json"])
        doc = json.loads(capsys.readouterr().out)
        assert list(doc) == ["channels", "broker_check"]
        assert doc["broker_check"]["missing_on_broker"][0]["guest"] == "app2"


def test_cli_broker_check_that_cannot_reach_the_broker_exits_1(tmp_path: Path, capsys: Any) -> None:
    with ServedState(str(tmp_path / "c.sock"), sample_snapshot()) as served:
        status = cli.main(
            ["--control-socket", served.control.path, "--broker-check", "--broker",
             "amqp://127.0.0.1:1", "guest", "web1"]
        )  # fmt: skip
    out = capsys.readouterr().out
    assert status == cli.EXIT_UNHEALTHY
    assert "broker check failed: cannot open a management connection to amqp://127.0.0.1:1" in out
