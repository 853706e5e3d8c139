"""Throwaway certificates for TLS tests, made by the openssl command line."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed(tmp: Path, name: str, cn: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate and its key, valid for the IP address 127.0.0.1; being
    its own CA, the certificate is also the trust store that accepts it."""
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={cn}", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key
