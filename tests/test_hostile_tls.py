"""Hostile or broken clients at the TLS layer of the real listener; the broker keeps serving.

(No client cert, another CA, serverAuth-only and TLS 1.2 are in test_api_errors.py.)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import resource
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker import certs
from tests.conftest import BrokerFactory, Pki, RunningBroker


async def _assert_still_serving(b: RunningBroker) -> None:
    body = await b.get_token()
    assert body["profile"] == "demo"


def _handshake(b: RunningBroker, cert: Path, key: Path) -> None:
    """Handshake and one request; raises on refusal (TLS 1.3 reports a client-cert refusal late)."""
    ctx = ssl.create_default_context(cafile=str(b.pki.ca))
    ctx.load_cert_chain(cert, key)
    with socket.create_connection(("127.0.0.1", b.broker.api_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = tls.recv(4096)
            if not data:
                raise ConnectionResetError("closed without an answer")
            raise AssertionError(f"the broker answered a refused client: {data[:60]!r}")


def _expect_refused(b: RunningBroker, cert: Path, key: Path) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(b, cert, key)


@pytest.fixture(scope="module")
def odd_certs(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> dict[str, tuple[Path, Path]]:
    now = dt.datetime.now(dt.timezone.utc)
    made = {
        "expired": certs.issue_client(pki.dir, "expired", not_before=now - dt.timedelta(days=10),
                                      not_after=now - dt.timedelta(days=1), force=True),
        "not-yet-valid": certs.issue_client(pki.dir, "future", not_before=now + dt.timedelta(days=1),
                                            not_after=now + dt.timedelta(days=10), force=True),
    }
    d = tmp_path_factory.mktemp("self-signed")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "job")])  # claims to be the job
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    (d / "self.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "self.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    made["self-signed"] = (d / "self.pem", d / "self.key")
    return made


@pytest.mark.parametrize("kind", ["expired", "not-yet-valid", "self-signed"])
async def test_invalid_client_certs_are_refused_at_the_handshake(brokers: BrokerFactory, kind: str,
                                                               odd_certs: dict[str, tuple[Path, Path]]) -> None:
    b = await brokers.start()
    await asyncio.to_thread(_expect_refused, b, *odd_certs[kind])
    await _assert_still_serving(b)


def _raw_exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        chunks = []
        try:
            while chunk := s.recv(4096):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


async def test_plain_http_to_the_tls_port_gets_no_answer(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    answer = await asyncio.to_thread(_raw_exchange, b.broker.api_port,
                                     b"GET /v1/tokens/demo HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert b"token" not in answer and b"HTTP/1.1 200" not in answer
    await _assert_still_serving(b)


async def test_garbage_before_the_handshake_is_dropped(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    answer = await asyncio.to_thread(_raw_exchange, b.broker.api_port, bytes(range(256)) * 8)
    assert b"HTTP" not in answer
    await _assert_still_serving(b)


async def test_a_handshake_that_never_completes_is_timed_out(brokers: BrokerFactory) -> None:
    b = await brokers.start(server_extra='handshake_timeout = "1s"')
    assert b.metric("broker_tls_handshakes_total", outcome="timeout") is None
    reader, writer = await asyncio.open_connection("127.0.0.1", b.broker.api_port)
    data = await asyncio.wait_for(reader.read(), timeout=10)  # EOF when the broker gives up
    writer.close()
    assert data == b""
    assert b.metric("broker_tls_handshakes_total", outcome="timeout") == 1, "closed by the handshake timeout"
    assert b.metric("broker_tls_handshakes_total", outcome="failure") is None
    await _assert_still_serving(b)


async def test_a_thousand_idle_connections_do_not_stop_a_real_client(brokers: BrokerFactory) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    b = await brokers.start()
    idle = []
    try:
        for _ in range(1000):  # slowloris: connect, say nothing
            idle.append(await asyncio.open_connection("127.0.0.1", b.broker.api_port))
        for _ in range(3):
            await _assert_still_serving(b)
        status, ready = await b.ops("/readyz")
        assert status == 200
    finally:
        for _, writer in idle:
            writer.close()
