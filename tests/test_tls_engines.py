"""The listener's TLS engines: pyOpenSSL (default) enforces tls13_ciphersuites exactly and
refuses a cert without clientAuth EKU in the handshake; the stdlib engine stays available."""

from __future__ import annotations

import asyncio
import socket
import ssl

import aiohttp
import pytest
from OpenSSL import SSL

from tests.conftest import BrokerFactory, Pki, RunningBroker


def _openssl_client(pki: Pki, suites: str, name: str = "job") -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_tls13_ciphersuites(suites.encode())
    ctx.load_verify_locations(str(pki.ca))
    ctx.use_certificate_chain_file(str(pki.dir / f"{name}.pem"))
    ctx.use_privatekey_file(str(pki.dir / f"{name}.key"))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    return ctx


def _fetch_with(ctx: SSL.Context, port: int) -> tuple[str, bytes]:
    """Handshake with the given client context and GET /v1/whoami: (cipher, first answer bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.settimeout(None)  # pyOpenSSL wants a blocking socket; the broker ends the exchange
        conn = SSL.Connection(ctx, raw)
        conn.set_tlsext_host_name(b"localhost")
        conn.set_connect_state()
        conn.do_handshake()
        conn.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = conn.recv(4096)
        return conn.get_cipher_name() or "", data


async def test_only_the_configured_tls13_suites_are_accepted(brokers: BrokerFactory) -> None:
    b = await brokers.start(server_extra='tls13_ciphersuites = ["TLS_AES_128_GCM_SHA256"]')
    cipher, data = await asyncio.to_thread(_fetch_with, _openssl_client(b.pki, "TLS_AES_128_GCM_SHA256"),
                                           b.broker.api_port)
    assert cipher == "TLS_AES_128_GCM_SHA256" and data.startswith(b"HTTP/1.1 200")
    with pytest.raises((SSL.Error, ConnectionError)):
        await asyncio.to_thread(_fetch_with, _openssl_client(b.pki, "TLS_CHACHA20_POLY1305_SHA256"),
                                b.broker.api_port)
    with pytest.raises((SSL.Error, ConnectionError)):
        await asyncio.to_thread(_fetch_with, _openssl_client(b.pki, "TLS_AES_256_GCM_SHA384"), b.broker.api_port)
    assert b.metric("broker_tls_handshakes_total", outcome="success") >= 1
    assert b.metric("broker_tls_handshakes_total", outcome="failure") >= 2
    assert (await b.get_token())["profile"] == "demo"  # aiohttp's client offers AES-128-GCM too


async def test_default_suites_refuse_chacha20(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    with pytest.raises((SSL.Error, ConnectionError)):
        await asyncio.to_thread(_fetch_with, _openssl_client(b.pki, "TLS_CHACHA20_POLY1305_SHA256"),
                                b.broker.api_port)
    cipher, data = await asyncio.to_thread(_fetch_with, _openssl_client(b.pki, "TLS_AES_256_GCM_SHA384"),
                                           b.broker.api_port)
    assert cipher == "TLS_AES_256_GCM_SHA384" and b"cn:job" in data


async def test_the_server_sends_the_chain_in_its_cert_file_as_it_is(brokers: BrokerFactory) -> None:
    """server.pem holds the leaf only, so the leaf is all that is sent: no chain is built from
    the trust store in each handshake (it used to add the CA, verifying it every time)."""
    b = await brokers.start()

    def chain() -> list[str]:
        with socket.create_connection(("127.0.0.1", b.broker.api_port), timeout=5) as raw:
            raw.settimeout(None)
            conn = SSL.Connection(_openssl_client(b.pki, "TLS_AES_256_GCM_SHA384"), raw)
            conn.set_tlsext_host_name(b"localhost")
            conn.set_connect_state()
            conn.do_handshake()
            sent = conn.get_peer_cert_chain(as_cryptography=True) or []
            conn.shutdown()
            return [cert.subject.rfc4514_string() for cert in sent]

    assert await asyncio.to_thread(chain) == ["CN=localhost"]


def _whoami_resuming(port: int, ctx: ssl.SSLContext,
                     session: ssl.SSLSession | None) -> tuple[ssl.SSLSession, bool, bytes]:
    """GET /v1/whoami on a new connection offering ``session``: (the session it leaves, whether
    the server resumed, the answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(4096):  # the session tickets, if any, arrive before the answer
                answer += chunk
            assert tls.session is not None
            return tls.session, tls.session_reused, answer


async def test_no_session_is_ever_resumed(brokers: BrokerFactory) -> None:
    """A resumed TLS 1.3 session skips the client certificate, so a CA change or a revoked cert
    would not apply to it: every connection must be a full handshake. (OpenSSL still sends
    stateful tickets with OP_NO_TICKET; with the session cache off they name nothing.)"""
    b = await brokers.start()
    ctx = b.pki.client_context("job")  # a session belongs to the client context that made it
    session, reused, answer = await asyncio.to_thread(_whoami_resuming, b.broker.api_port, ctx, None)
    assert not reused and answer.startswith(b"HTTP/1.1 200")
    for _ in range(2):
        _, reused, answer = await asyncio.to_thread(_whoami_resuming, b.broker.api_port, ctx, session)
        assert not reused and answer.startswith(b"HTTP/1.1 200")
    assert b.metric("broker_tls_handshakes_total", outcome="success") == 3


async def test_handshake_timeouts_are_counted(brokers: BrokerFactory) -> None:
    b = await brokers.start(server_extra='handshake_timeout = "500ms"')
    reader, writer = await asyncio.open_connection("127.0.0.1", b.broker.api_port)
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    writer.close()
    assert b.metric("broker_tls_handshakes_total", outcome="timeout") == 1


async def _stdlib_broker(brokers: BrokerFactory) -> RunningBroker:
    return await brokers.start(server_extra='tls_engine = "stdlib"')


async def test_stdlib_engine_serves_and_answers_no_eku_with_403(brokers: BrokerFactory) -> None:
    b = await _stdlib_broker(brokers)
    assert (await b.get_token())["profile"] == "demo"
    status, body, headers = await b.request("GET", "/v1/tokens/demo", cert="no-eku")
    assert status == 403 and body["error"] == "forbidden" and "extendedKeyUsage" in body["message"]
    with pytest.raises(aiohttp.ClientError):  # serverAuth-only: refused in the handshake on both engines
        await b.request("GET", "/v1/whoami", cert="server-only")
    assert (await b.get_token())["profile"] == "demo"


@pytest.mark.parametrize("name", ["no-eku", "server-only"])
async def test_a_cert_without_client_auth_gets_the_alert_unsupported_certificate(brokers: BrokerFactory,
                                                                                 name: str) -> None:
    """No EKU at all (OpenSSL would let it pass) and an EKU without clientAuth (OpenSSL refuses
    it) get the same alert, which names the problem; before, the first got internal_error."""
    b = await brokers.start()
    with pytest.raises(SSL.Error, match="alert unsupported certificate"):
        await asyncio.to_thread(_fetch_with, _openssl_client(b.pki, "TLS_AES_128_GCM_SHA256", name=name),
                                b.broker.api_port)
    assert b.metric("broker_tls_handshakes_total", outcome="failure") == 1
    assert (await b.get_token())["profile"] == "demo"
