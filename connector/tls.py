"""TLS to the broker, sans-IO: ciphertext in, plaintext out, and the reverse.

TLS is terminated here with Python's ``ssl`` module rather than inside proton (its SSL
layer sits inside the transport): the upstream engine reads and rewrites AMQP frames in
the bytes it pushes and pulls (the attach fields proton drops), which must therefore be
plaintext. A ``TLSSession`` sits between that engine and the socket: the channel feeds it
what the socket read and pushes the plaintext it returns into the engine, and writes the
socket from it exactly as it writes a plain socket from the engine (``peek_output`` /
``pop_output``), the session pulling and encrypting the engine's output as it goes.

No file descriptor, no blocking: an ``ssl.SSLObject`` over two ``ssl.MemoryBIO``.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from typing import Protocol

from .errors import ConnectorError

# The most plaintext asked of OpenSSL per read; it hands out at most one TLS record
# (16 KiB) per call anyway, so this only has to be larger than that.
_READ_SIZE = 64 * 1024
# OpenSSL's messages come as "[SSL: CODE] text (_ssl.c:NNNN)"; the text alone is the reason.
_OPENSSL_NOISE = re.compile(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$")


class TLSError(ConnectorError):
    """The TLS session failed: the handshake was refused (certificate, host name, protocol
    version) or a record could not be decrypted. The session is unusable; the connection
    is to be dropped. The message is one line, e.g. ``TLS: certificate verify failed:
    self-signed certificate``; the ``ssl.SSLError`` is its ``__cause__``."""

    def __init__(self, err: ssl.SSLError) -> None:
        super().__init__(f"TLS: {ssl_reason(err)}")


def ssl_reason(err: OSError) -> str:
    """An ``ssl.SSLError`` (or OSError) as its reason alone, without OpenSSL's code and
    source line: ``certificate verify failed: self-signed certificate``."""
    return _OPENSSL_NOISE.sub("", err.strerror or str(err))


class OutputSource(Protocol):
    """Bytes waiting to be written, handed out without copying: ``Engine``'s interface,
    which ``TLSSession`` both consumes (plaintext) and provides (ciphertext)."""

    def peek_output(self) -> memoryview:
        """The next bytes to write, valid until the next call."""

    def pop_output(self, n: int) -> None:
        """``n`` bytes of the peeked output were written."""

    def output_pending(self) -> int:
        """Bytes still to write; zero or less when there are none."""


class TLSSession:
    """The client side of one TLS connection between an engine and a non-blocking socket.

    Until the handshake completes only handshake records are handed out; the engine's
    output waits in the engine, where backpressure counts it.
    """

    __slots__ = (
        "_failed",
        "_in",
        "_out",
        "_plaintext",
        "_pos",
        "_ssl",
        "_unsent",
        "established",
        "peer_closed",
    )

    def __init__(
        self, context: ssl.SSLContext, server_hostname: str, plaintext: OutputSource
    ) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        # server_hostname is sent as SNI (unless it is an IP address) and, when the context
        # checks host names, matched against the certificate (DNS name or IP address).
        self._ssl = context.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        self._plaintext = plaintext
        self._unsent = b""  # ciphertext the socket has not taken yet, from _pos on
        self._pos = 0
        self._failed = False  # an error was raised: the session is unusable
        self.established = False  # the handshake completed: the broker's certificate passed
        self.peer_closed = False  # the broker's close_notify arrived: its stream has ended

    # -- from the socket -----------------------------------------------------------------

    def receive(self, ciphertext: bytes) -> bytes:
        """Take bytes read from the socket; return all the plaintext they complete.

        Every whole record is decrypted now, so no plaintext stays inside the session while
        the socket has nothing more to say. Raises ``TLSError``. After the broker's
        close_notify (``peer_closed``), anything more is ignored.
        """
        if self.peer_closed:
            return b""
        self._in.write(ciphertext)
        if not self._handshake():
            return b""
        chunks = []
        while True:
            try:
                chunk = self._ssl.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as err:
                raise self._fail(err) from err
            if not chunk:  # close_notify
                self.peer_closed = True
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def stream_ended(self) -> None:
        """The socket read end of stream. After the broker's close_notify that is its clean
        end; before it, the TLS stream was cut short (in the handshake or inside a record),
        which raises ``TLSError`` in ssl's words, so the reason says TLS rather than what
        the AMQP engine makes of the missing bytes."""
        if self.peer_closed or self._failed:
            return
        self._in.write_eof()
        try:
            if self.established:
                self._ssl.read(_READ_SIZE)
            else:
                self._ssl.do_handshake()
        except ssl.SSLError as err:
            raise self._fail(err) from err

    # -- to the socket -------------------------------------------------------------------

    def peek_output(self) -> memoryview:
        """Ciphertext to write: what the socket has not taken yet, else handshake records,
        else the engine's next plaintext, encrypted. Raises ``TLSError``."""
        if self._pos >= len(self._unsent):
            if not self._out.pending and self._handshake():
                self._encrypt()
            self._unsent = self._out.read()
            self._pos = 0
        return memoryview(self._unsent)[self._pos :]

    def pop_output(self, n: int) -> None:
        """``n`` bytes of the peeked ciphertext were written."""
        self._pos += n

    def output_pending(self) -> int:
        """Ciphertext not yet written, else whatever the engine has left to write."""
        left = len(self._unsent) - self._pos
        return left if left > 0 else self._plaintext.output_pending()

    def close(self) -> bytes:
        """The last bytes for the broker before the socket closes: whatever was not sent,
        then our close_notify, or the alert that says why the handshake failed."""
        if not self._failed:
            # Raises when the broker's close_notify has not come (it is not awaited) or
            # there was no handshake; either way the out BIO holds what is due.
            with contextlib.suppress(ssl.SSLError):
                self._ssl.unwrap()
        rest = self._unsent[self._pos :] + self._out.read()
        self._unsent = b""
        self._pos = 0
        return rest

    # -- inside --------------------------------------------------------------------------

    def _handshake(self) -> bool:
        """Advance the handshake with what has arrived; True once it is complete."""
        if self.established:
            return True
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as err:
            raise self._fail(err) from err
        self.established = True
        return True

    def _encrypt(self) -> None:
        """Encrypt the engine's next output into the outgoing BIO (never blocks)."""
        source = self._plaintext
        data = source.peek_output()
        if not data:
            return
        try:
            n = self._ssl.write(data)
        except ssl.SSLWantReadError:  # a TLS 1.2 renegotiation needs the broker first
            return
        except ssl.SSLError as err:
            raise self._fail(err) from err
        source.pop_output(n)

    def _fail(self, err: ssl.SSLError) -> TLSError:
        self._failed = True
        return TLSError(err)
