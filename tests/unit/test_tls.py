"""The sans-IO TLS session alone: our client session against a stdlib server SSLObject,
back to back in memory, with certificates made by openssl."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from connector.errors import ConfigError
from connector.tls import TLSError, TLSSession
from connector.upstream import BrokerPool, BrokerURL, TLSSettings, UpstreamSettings, tls_context
from tests.support.certs import self_signed

CHUNK = 64 * 1024  # what an engine hands out per peek
BIG = 3 * 1024 * 1024 + 17  # many TLS records, not a multiple of anything


class _Plain:
    """The engine's side of the session: plaintext to send, handed out as Engine does."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data)

    def peek_output(self) -> memoryview:
        return memoryview(bytes(self.data[:CHUNK]))

    def pop_output(self, n: int) -> None:
        del self.data[:n]

    def output_pending(self) -> int:
        return len(self.data)


class _Server:
    """The broker's end: a stdlib SSLObject over two memory BIOs."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.received = bytearray()

    def step(self) -> None:
        """Advance the handshake, or collect what arrived."""
        try:
            if self.ssl.version() is None:
                self.ssl.do_handshake()
            while chunk := self.ssl.read(CHUNK):
                self.received += chunk
        except ssl.SSLWantReadError:
            pass


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("certs")
    return {
        name: self_signed(tmp, name, cn)
        for name, cn in (("broker", "127.0.0.1"), ("other", "127.0.0.1"), ("agent", "host-a"))
    }


def _server_context(certs: dict[str, tuple[Path, Path]]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certs["broker"])
    return context


def _client(
    certs: dict[str, tuple[Path, Path]],
    plain: _Plain,
    host: str = "127.0.0.1",
    **settings: object,
) -> TLSSession:
    tls = TLSSettings(ca_file=str(certs["broker"][0]), **settings)  # type: ignore[arg-type]
    return TLSSession(tls_context(tls), host, plain)


def _send(client: TLSSession, server: _Server, piece: int = CHUNK) -> None:
    """Everything the client has to send, taken ``piece`` bytes at a time as a full socket
    would take it."""
    while out := client.peek_output():
        n = min(piece, len(out))
        server.incoming.write(out[:n])
        client.pop_output(n)
        server.step()


def _answer(client: TLSSession, server: _Server) -> bytes:
    return client.receive(server.outgoing.read())


def _handshake(client: TLSSession, server: _Server) -> None:
    for _ in range(4):
        _send(client, server)
        _answer(client, server)
    assert client.established


def test_handshake_first_then_data_both_ways_in_partial_writes(certs: dict) -> None:
    body = bytes(range(256)) * (BIG // 256) + b"tail"
    plain = _Plain(body)
    client = _client(certs, plain)
    server = _Server(_server_context(certs))
    hello = client.peek_output()
    assert hello and not client.established
    assert plain.output_pending() == len(body)  # nothing is encrypted before the handshake
    _handshake(client, server)
    _send(client, server, piece=5000)  # a socket that takes only part of each write
    assert plain.output_pending() == 0
    assert bytes(server.received) == body
    server.ssl.write(body)
    # All of it in one read: every record is decrypted now, none left inside the session.
    assert _answer(client, server) == body
    assert client.receive(b"") == b""


def test_plaintext_split_across_reads_comes_out_whole(certs: dict) -> None:
    client = _client(certs, _Plain())
    server = _Server(_server_context(certs))
    _handshake(client, server)
    body = b"\x5a" * BIG
    server.ssl.write(body)
    wire = server.outgoing.read()
    got = b"".join(client.receive(wire[i : i + 7000]) for i in range(0, len(wire), 7000))
    assert got == body


def test_a_wrong_ca_fails_the_handshake_and_the_broker_is_told(certs: dict) -> None:
    plain = _Plain(b"AMQP\x00\x01\x00\x00")
    tls = TLSSettings(ca_file=str(certs["other"][0]))
    client = TLSSession(tls_context(tls), "127.0.0.1", plain)
    server = _Server(_server_context(certs))
    _send(client, server)
    with pytest.raises(TLSError) as refused:
        _answer(client, server)
    assert str(refused.value) == "TLS: certificate verify failed: self-signed certificate"
    assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
    assert plain.output_pending() == 8  # no plaintext went anywhere
    server.incoming.write(client.close())  # the alert
    with pytest.raises(ssl.SSLError, match="unknown ca"):
        server.ssl.do_handshake()


def test_the_host_name_is_checked_unless_turned_off(certs: dict) -> None:
    client = _client(certs, _Plain(), host="localhost")
    server = _Server(_server_context(certs))
    _send(client, server)
    with pytest.raises(TLSError, match="Hostname mismatch"):
        _answer(client, server)

    client = _client(certs, _Plain(), host="localhost", verify_hostname=False)
    server = _Server(_server_context(certs))
    _handshake(client, server)


def test_our_certificate_is_offered_when_set(certs: dict) -> None:
    context = _server_context(certs)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(certs["agent"][0])
    cert, key = certs["agent"]
    client = _client(certs, _Plain(), cert_file=str(cert), key_file=str(key))
    server = _Server(context)
    _handshake(client, server)
    _send(client, server)
    peer = server.ssl.getpeercert()
    assert peer is not None and peer["subject"] == ((("commonName", "host-a"),),)


def test_a_corrupt_record_is_a_tls_error(certs: dict) -> None:
    client = _client(certs, _Plain())
    server = _Server(_server_context(certs))
    _handshake(client, server)
    server.ssl.write(b"frame")
    record = bytearray(server.outgoing.read())
    record[-1] ^= 0xFF
    with pytest.raises(TLSError, match=r"^TLS: [a-z]"):
        client.receive(bytes(record))


def test_the_brokers_close_notify_ends_its_stream(certs: dict) -> None:
    client = _client(certs, _Plain())
    server = _Server(_server_context(certs))
    _handshake(client, server)
    server.ssl.write(b"last frame")
    with pytest.raises(ssl.SSLWantReadError):
        server.ssl.unwrap()
    assert _answer(client, server) == b"last frame"
    assert client.peer_closed
    assert client.receive(b"\x17\x03\x03 whatever") == b""  # ignored after the end
    # Our close_notify still goes out, answering the broker's.
    server.incoming.write(client.close())
    server.ssl.unwrap()


@pytest.mark.parametrize("when", ["in-the-handshake", "inside-a-record"])
def test_an_end_of_stream_before_close_notify_is_a_tls_error(certs: dict, when: str) -> None:
    """A stream cut short is named as TLS's failure, not left to the AMQP engine to read
    as missing bytes; after a close_notify the end of stream is the broker's clean end."""
    client = _client(certs, _Plain())
    server = _Server(_server_context(certs))
    if when == "inside-a-record":
        _handshake(client, server)
        server.ssl.write(b"x" * 1000)
        record = server.outgoing.read()
        client.receive(record[: len(record) // 2])
    else:
        client.peek_output()  # the ClientHello, never answered
    with pytest.raises(TLSError, match=r"^TLS: "):
        client.stream_ended()


def test_an_end_of_stream_after_close_notify_is_clean(certs: dict) -> None:
    client = _client(certs, _Plain())
    server = _Server(_server_context(certs))
    _handshake(client, server)
    with pytest.raises(ssl.SSLWantReadError):
        server.ssl.unwrap()
    _answer(client, server)
    assert client.peer_closed
    client.stream_ended()  # no error


def test_our_close_sends_close_notify(certs: dict) -> None:
    client = _client(certs, _Plain())
    server = _Server(_server_context(certs))
    _handshake(client, server)
    server.incoming.write(client.close())
    assert server.ssl.read(CHUNK) == b""


def test_unsent_ciphertext_counts_as_pending_and_goes_out_first_at_close(certs: dict) -> None:
    plain = _Plain()
    client = _client(certs, plain)
    server = _Server(_server_context(certs))
    _handshake(client, server)
    plain.data += b"x" * 100
    out = client.peek_output()
    assert plain.output_pending() == 0
    client.pop_output(10)
    assert client.output_pending() == len(out) - 10
    server.incoming.write(out[:10])
    server.incoming.write(client.close())
    server.step()
    assert bytes(server.received) == b"x" * 100
    assert server.ssl.read(CHUNK) == b""  # then our close_notify


def test_unusable_tls_files_name_their_key(certs: dict, tmp_path: Path) -> None:
    cert, _ = certs["agent"]
    _, wrong_key = certs["broker"]
    with pytest.raises(ConfigError) as mismatch:
        tls_context(TLSSettings(cert_file=str(cert), key_file=str(wrong_key)))
    assert mismatch.value.where == "broker.tls.cert_file"
    assert "key values mismatch" in str(mismatch.value)
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as bad_ca:
        tls_context(TLSSettings(ca_file=str(not_pem)))
    assert bad_ca.value.where == "broker.tls.ca_file"


def test_the_pool_makes_tls_sessions_for_amqps_only(certs: dict) -> None:
    plain_url, tls_url = BrokerURL.parse("amqp://h"), BrokerURL.parse("amqps://h")
    settings = UpstreamSettings(urls=(plain_url,), tls=TLSSettings(ca_file="/nonexistent"))
    assert BrokerPool(settings).tls_session(plain_url, _Plain()) is None  # no context loaded
    settings = UpstreamSettings(
        urls=(plain_url, tls_url), tls=TLSSettings(ca_file=str(certs["broker"][0]))
    )
    pool = BrokerPool(settings)
    assert pool.tls_session(plain_url, _Plain()) is None
    assert isinstance(pool.tls_session(tls_url, _Plain()), TLSSession)
