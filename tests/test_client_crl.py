"""[server] client_crl: a revoked client certificate is refused in the handshake (both engines),
on connections opened before a reload brought the CRL in, and by `broker get` with a message
that says so; a wrong or stale CRL fails the start or the reload that loads it; a CRL that goes
stale while loaded makes the broker unready; `broker certs crl` writes one for the dev CA."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from broker import certs
from broker.config import load_config
from broker.devserver import OpenBaoDevServer
from broker.errors import CertError
from broker.identity import Caller
from broker.ops.health import readiness
from broker.tls import ClientCrl, load_client_crl
from tests.conftest import BrokerFactory, Pki, assert_still_serving, write_config
from tests.test_cli import assert_one_line_error, broker_cli, job_env
from tests.test_tls_engines import _fetch_with, _openssl_client


@pytest.fixture
def own_pki(pki: Pki, tmp_path: Path) -> Pki:
    """The session PKI copied, so that this test's ca.crl is its own."""
    shutil.copytree(pki.dir, tmp_path / "pki")
    return Pki(tmp_path / "pki", pki.other_dir)


@pytest.fixture
async def crl_brokers(own_pki: Pki, tmp_path: Path, openbao: OpenBaoDevServer,
                      log_lines: list[str]) -> AsyncIterator[BrokerFactory]:
    factory = BrokerFactory(tmp_path / "brokers", own_pki, openbao, log_lines)
    try:
        yield factory
    finally:
        await factory.close()


def crl_setting(path: Path, engine: str = "openssl") -> str:
    return f'client_crl = "{path}"\ntls_engine = "{engine}"'


def signed_crl(ca_dir: Path, serials: list[int], *, last_update: dt.datetime,
               next_update: dt.datetime | None, number: int | None = None) -> bytes:
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    builder = x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(last_update)
    if next_update is not None:
        builder = builder.next_update(next_update)
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last_update).build())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def another_ca(directory: Path) -> Path:
    """A CA of another name, ca.pem and ca.key in ``directory``."""
    directory.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "another CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return directory


def caller_named(pki: Pki, name: str) -> Caller:
    """The Caller the broker makes of ``name``'s certificate."""
    pem = pki.pair(name)[0].read_bytes()
    return Caller.from_der(x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER))


def serial_of(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


async def keep_alive_session(pki: Pki, name: str) -> aiohttp.ClientSession:
    """One connection, kept open between requests."""
    cert, key = pki.pair(name)
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(cert, key)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=1))


# --- the handshake ---------------------------------------------------------------------------

async def test_a_revoked_certificate_is_refused_with_the_alert_certificate_revoked(
        crl_brokers: BrokerFactory, own_pki: Pki, log_lines: list[str]) -> None:
    crl, listed = certs.revoke_clients(own_pki.dir, ["job-other"])
    assert listed == 1
    b = await crl_brokers.start(server_extra=crl_setting(crl))
    for _ in range(2):
        with pytest.raises(SSL.Error, match="certificate revoked"):
            await asyncio.to_thread(_fetch_with, _openssl_client(own_pki, "TLS_AES_128_GCM_SHA256", name="job-other"),
                                    b.broker.api_port)
    assert b.metric("broker_tls_handshakes_total", outcome="failure") == 2
    other = caller_named(own_pki, "job-other")
    attempts = [line for line in log_lines if "tls_refused_revoked_certificate" in line]
    assert attempts == [f"WARNING broker.tls tls_refused_revoked_certificate certificate_fp={other.fingerprint[:16]} "
                        "identity=cn:job-other reason=the client_crl lists this certificate (logged once a minute "
                        "per certificate)"], "security hears of it, once a minute per certificate"
    cipher, answer = await asyncio.to_thread(_fetch_with, _openssl_client(own_pki, "TLS_AES_128_GCM_SHA256"),
                                             b.broker.api_port)
    assert answer.startswith(b"HTTP/1.1 200") and b"cn:job" in answer  # the certificate not listed
    await assert_still_serving(b)


async def test_the_stdlib_engine_refuses_a_revoked_certificate_too(crl_brokers: BrokerFactory,
                                                                   own_pki: Pki) -> None:
    crl, _ = certs.revoke_clients(own_pki.dir, ["job-other"])
    b = await crl_brokers.start(server_extra=crl_setting(crl, "stdlib"))
    with pytest.raises(aiohttp.ClientError):  # asyncio's SSL transport drops the alert (README, TLS engines)
        await b.request("GET", "/v1/whoami", cert="job-other")
    await assert_still_serving(b)
    assert (await b.request("GET", "/v1/whoami", cert="job"))[0] == 200


async def test_broker_get_with_a_revoked_certificate_says_so_and_does_not_retry(
        crl_brokers: BrokerFactory, own_pki: Pki) -> None:
    crl, _ = certs.revoke_clients(own_pki.dir, ["job-other"])
    b = await crl_brokers.start(server_extra=crl_setting(crl))
    run = await broker_cli("get", "demo", "--retries", "5", env=job_env(b, cert="job-other"))
    assert_one_line_error(run, 1, b.url, "it is revoked", "client_crl", "CERTIFICATE_REVOKED",
                          "ask for a new certificate", secrets=b.seen_secrets)
    assert b.metric("broker_tls_handshakes_total", outcome="failure") == 1, "not retried"
    assert (await broker_cli("get", "demo", env=job_env(b))).code == 0


# --- reload ----------------------------------------------------------------------------------

async def test_a_reload_refuses_open_connections_of_a_newly_revoked_certificate(
        crl_brokers: BrokerFactory, own_pki: Pki) -> None:
    """A keep-alive connection made before the CRL listed its certificate is never handshaken
    again: its next request gets 403 and the connection is closed; new ones are refused."""
    empty, listed = certs.revoke_clients(own_pki.dir)
    assert listed == 0
    b = await crl_brokers.start(server_extra=crl_setting(empty))
    # Two connections of the certificate about to be revoked (the hot route and the full
    # handler each get one) and one of another certificate.
    sessions = [await keep_alive_session(own_pki, name) for name in ("job-other", "job-other", "job")]
    try:
        for session in sessions:
            async with session.get(b.url + "/v1/tokens/demo") as response:
                assert response.status == 200
                b.record_answer(200, await response.text())
        certs.revoke_clients(own_pki.dir, ["job-other"])
        b.broker.reload_tls()
        for session, path in zip(sessions, ("/v1/tokens/demo", "/v1/whoami")):
            async with session.get(b.url + path) as response:
                body = await response.json()
                assert response.status == 403 and body["error"] == "forbidden", body
                assert "revoked" in body["message"] and "client_crl" in body["message"]
                assert response.headers["Connection"] == "close"
                assert response.headers["Cache-Control"] == "no-store"
        async with sessions[2].get(b.url + "/v1/tokens/demo") as response:
            assert response.status == 200  # the other certificate's open connection is untouched
            b.record_answer(200, await response.text())
        assert b.metric("broker_tls_handshakes_total", outcome="success") == 3, "no request above reconnected"
    finally:
        for session in sessions:
            await session.close()
    with pytest.raises(aiohttp.ClientError):
        await b.request("GET", "/v1/whoami", cert="job-other")
    denied = [e for e in b.audit_events() if e["event"] == "token_denied" and e["reason"] == "certificate revoked"]
    other = caller_named(own_pki, "job-other")
    assert len(denied) == 2 and all(e["certificate_fp"] == other.fingerprint[:16] for e in denied)
    assert denied[0]["identity"] == "cn:job-other"
    assert b.metric("broker_token_requests_total", profile="_any", outcome="revoked_certificate") == 2
    await assert_still_serving(b)


async def test_a_bad_crl_at_reload_keeps_the_one_in_force(crl_brokers: BrokerFactory, own_pki: Pki,
                                                          log_lines: list[str]) -> None:
    crl, _ = certs.revoke_clients(own_pki.dir, ["job-other"])
    b = await crl_brokers.start(server_extra=crl_setting(crl))
    crl.write_text("not a CRL\n")
    b.broker.reload_tls()
    assert any("tls_reload_failed" in line and "does not contain a PEM CRL" in line
               and "keeping the previous certificate, client_ca and client_crl" in line for line in log_lines)
    assert b.metric("broker_tls_reloads_total", outcome="failure") == 1
    status, details = await b.ops("/readyz")
    assert status == 200, "the broker serves as before"
    assert details["tls"]["reload_error"].startswith("the last reload (SIGHUP) failed, the previous certificate, "
                                                     "client_ca and client_crl are in force: client_crl ")
    with pytest.raises(SSL.Error, match="certificate revoked"):  # the CRL loaded before still applies
        await asyncio.to_thread(_fetch_with, _openssl_client(own_pki, "TLS_AES_128_GCM_SHA256", name="job-other"),
                                b.broker.api_port)
    await assert_still_serving(b)
    crl.unlink()
    certs.revoke_clients(own_pki.dir, ["job-other"])
    b.broker.reload_tls()
    assert (await b.ops("/readyz"))[1]["tls"]["reload_error"] is None
    assert b.metric("broker_tls_reloads_total", outcome="success") == 1


# --- staleness -------------------------------------------------------------------------------

async def test_a_crl_that_goes_stale_makes_the_broker_unready_and_is_in_the_metrics(
        crl_brokers: BrokerFactory, own_pki: Pki) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    next_update = now + dt.timedelta(seconds=3)
    crl = own_pki.dir / "short.crl"
    crl.write_bytes(signed_crl(own_pki.dir, [], last_update=now - dt.timedelta(minutes=1), next_update=next_update))
    b = await crl_brokers.start(server_extra=crl_setting(crl))
    assert b.metric("broker_client_crl_next_update_timestamp_seconds") == int(next_update.timestamp())
    status, details = await b.ops("/readyz")
    assert status == 200 and details["tls"] == {"ok": True, "last_error": None, "reload_error": None}
    await asyncio.sleep(max(0.0, next_update.timestamp() - time.time()) + 0.2)
    status, details = await b.ops("/readyz")
    assert status == 503
    problem = details["tls"]["last_error"]
    assert problem in details["problems"]
    assert f"client_crl {crl} expired at" in problem and "every client certificate is refused" in problem
    # OpenSSL compares whole seconds: the CRL is stale to it from the second after nextUpdate.
    await asyncio.sleep(max(0.0, int(next_update.timestamp()) + 1.1 - time.time()))
    with pytest.raises(SSL.Error, match="certificate expired"):  # every client is refused on a stale CRL
        await asyncio.to_thread(_fetch_with, _openssl_client(own_pki, "TLS_AES_128_GCM_SHA256"), b.broker.api_port)
    run = await broker_cli("get", "demo", "--retries", "0", env=job_env(b))
    assert_one_line_error(run, 1, "refused this client certificate as expired", "valid now by this machine's clock",
                          "its client_crl is out of date", secrets=b.seen_secrets)


def test_without_a_crl_the_gauge_is_zero_and_readiness_says_nothing_about_tls() -> None:
    ready = readiness(0.0, [], True, True, None)
    assert ready.ready and ready.details["tls"] == {"ok": True, "last_error": None, "reload_error": None}
    unready = readiness(0.0, [], True, True, None, tls_error="client_crl x expired")
    assert not unready.ready and unready.details["problems"] == ["client_crl x expired"]


def test_client_crl_problem_is_a_pure_function_of_now(tmp_path: Path) -> None:
    crl = ClientCrl(tmp_path / "ca.crl", (), frozenset(), next_update=1000.0)
    assert crl.problem(999.9) is None
    assert "expired at 1970-01-01T00:16:40+00:00" in (crl.problem(1000.0) or "")
    assert ClientCrl(tmp_path / "ca.crl", (), frozenset(), next_update=None).problem(1e12) is None


# --- what a start (and `broker check`) refuses --------------------------------------------------

def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@pytest.mark.parametrize("case, needles", [
    ("missing", ["client_crl", "not found"]),
    ("not pem", ["does not contain a PEM CRL"]),
    ("garbled", ["holds a CRL that cannot be parsed"]),
    ("other CA", ["is not from a CA in client_ca"]),
    ("forged", ["is not signed by that CA's key in client_ca"]),
    ("stale", ["expired at", "(its nextUpdate); publish a newer one"]),
    ("future", ["is not valid until", "(its lastUpdate)"]),
])
def test_a_wrong_crl_is_refused_naming_the_file(own_pki: Pki, tmp_path: Path, case: str,
                                                needles: list[str]) -> None:
    path = tmp_path / "bad.crl"
    hour = dt.timedelta(hours=1)
    if case == "not pem":
        path.write_text("hello\n")
    elif case == "garbled":
        path.write_text("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    elif case == "other CA":
        path.write_bytes(signed_crl(another_ca(tmp_path / "another"), [], last_update=_now() - hour,
                                    next_update=_now() + hour))
    elif case == "forged":
        forged_dir = tmp_path / "forged"
        forged_dir.mkdir()
        shutil.copy(own_pki.ca, forged_dir / "ca.pem")  # the same CA name, another key
        (forged_dir / "ca.key").write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        path.write_bytes(signed_crl(forged_dir, [], last_update=_now() - hour, next_update=_now() + hour))
    elif case == "stale":
        path.write_bytes(signed_crl(own_pki.dir, [], last_update=_now() - 2 * hour, next_update=_now() - hour))
    elif case == "future":
        path.write_bytes(signed_crl(own_pki.dir, [], last_update=_now() + hour, next_update=_now() + 2 * hour))
    with pytest.raises(CertError) as raised:
        load_client_crl(path, own_pki.ca)
    message = str(raised.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message


async def test_broker_check_refuses_a_crl_from_another_ca(own_pki: Pki, tmp_path: Path) -> None:
    crl = tmp_path / "other.crl"
    hour = dt.timedelta(hours=1)
    crl.write_bytes(signed_crl(another_ca(tmp_path / "another"), [], last_update=_now() - hour,
                               next_update=_now() + hour))
    config = write_config(tmp_path, own_pki, "http://127.0.0.1:8200", [{"method": "token", "token_env": "T"}],
                          {"demo": {"token_role": "r", "policies": ["p"], "ttl": "1h", "grace": "5m",
                                    "allow": ["cn:job"]}}, server_extra=f'client_crl = "{crl}"')
    ran = await broker_cli("check", "--config", str(config))
    assert ran.code == 2, ran
    assert f"client_crl {crl}" in ran.err and "is not from a CA in client_ca" in ran.err
    crl.unlink()
    ran = await broker_cli("check", "--config", str(config))
    assert ran.code == 2 and "server.client_crl" in ran.err and "does not exist" in ran.err, ran


def test_an_empty_client_crl_setting_means_none(own_pki: Pki, tmp_path: Path) -> None:
    config = write_config(tmp_path, own_pki, "http://127.0.0.1:8200", [{"method": "token", "token_env": "T"}],
                          {"demo": {"token_role": "r", "policies": ["p"], "ttl": "1h", "grace": "5m",
                                    "allow": ["cn:job"]}}, server_extra='client_crl = ""')
    assert load_config(config).server.client_crl is None


# --- broker certs crl ----------------------------------------------------------------------------

async def test_broker_certs_crl_keeps_earlier_entries_and_renews_the_dates(own_pki: Pki) -> None:
    ran = await broker_cli("certs", "crl", "job-other", "--dir", str(own_pki.dir), "--days", "2")
    assert ran.code == 0, ran
    path = own_pki.dir / "ca.crl"
    assert ran.out.strip() == str(path)
    assert "1 certificate(s) listed, valid for 2 day(s)" in ran.err and "SIGHUP" in ran.err
    first = x509.load_pem_x509_crl(path.read_bytes())
    ran = await broker_cli("certs", "crl", "stranger", "--dir", str(own_pki.dir))
    assert ran.code == 0 and "2 certificate(s) listed, valid for 30 day(s)" in ran.err, ran
    second = load_client_crl(path, own_pki.ca)
    assert {serial for _issuer, serial in second.revoked} == {
        serial_of(own_pki.pair("job-other")[0]), serial_of(own_pki.pair("stranger")[0])}
    assert second.next_update is not None and second.next_update - time.time() > 29 * 86400
    number = x509.CRLNumber
    assert (second.crls[0].extensions.get_extension_for_class(number).value.crl_number
            > first.extensions.get_extension_for_class(number).value.crl_number)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("args, needles", [
    (["nosuch"], ["nosuch.pem", "No such file"]),
    (["job", "--days", "0"], ["days must be at least 1"]),
    (["job", "--days", "99999999"], ["days must be at most 36500"]),
])
async def test_broker_certs_crl_errors(own_pki: Pki, args: list[str], needles: list[str]) -> None:
    ran = await broker_cli("certs", "crl", *args, "--dir", str(own_pki.dir))
    assert ran.code == 2 and ran.out == "", ran
    for needle in needles:
        assert needle in ran.err, ran
    assert not (own_pki.dir / "ca.crl").exists()


async def test_broker_certs_crl_takes_a_path_to_a_certificate_kept_elsewhere(own_pki: Pki, tmp_path: Path) -> None:
    """NAME.pem may already be re-issued: the leaked certificate is revoked from its copy."""
    leaked = tmp_path / "leaked-job-other.pem"
    shutil.copy(own_pki.pair("job-other")[0], leaked)
    ran = await broker_cli("certs", "crl", str(leaked), "--dir", str(own_pki.dir))
    assert ran.code == 0, ran
    crl = load_client_crl(own_pki.dir / "ca.crl", own_pki.ca)
    assert {serial for _issuer, serial in crl.revoked} == {serial_of(leaked)}


async def test_broker_certs_crl_refuses_a_certificate_of_another_ca(own_pki: Pki) -> None:
    shutil.copy(own_pki.other_dir / "job.pem", own_pki.dir / "foreign.pem")
    ran = await broker_cli("certs", "crl", "foreign", "--dir", str(own_pki.dir))
    assert ran.code == 2 and "foreign.pem was not issued by the CA in" in ran.err, ran



def test_a_crl_spelling_its_issuer_differently_still_revokes_open_connections(tmp_path: Path) -> None:
    """OpenSSL matches a CRL to a certificate by the canonical name (string type and ASCII case
    do not count); the check of connections opened before a reload must match the same."""
    from cryptography.x509.oid import NameOID
    from OpenSSL import crypto

    now = _now()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    printable = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Runner CA", _type=x509.name._ASN1Type.PrintableString)])
    ca = (x509.CertificateBuilder().subject_name(printable).issuer_name(printable).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    job_key = ec.generate_private_key(ec.SECP256R1())
    job = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "job")]))
           .issuer_name(ca.subject).public_key(job_key.public_key()).serial_number(4242)
           .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
           .sign(ca_key, hashes.SHA256()))
    utf8_other_case = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "runner  ca", _type=x509.name._ASN1Type.UTF8String)])
    crl = (x509.CertificateRevocationListBuilder().issuer_name(utf8_other_case)
           .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(hours=1))
           .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(4242).revocation_date(now).build())
           .sign(ca_key, hashes.SHA256()))
    assert crl.issuer.public_bytes() != ca.subject.public_bytes()
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))

    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(ca))
    store.add_crl(crl)
    store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    with pytest.raises(crypto.X509StoreContextError, match="revoked"):  # OpenSSL's reading
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(job)).verify_certificate()
    loaded = load_client_crl(tmp_path / "ca.crl", tmp_path / "ca.pem")
    assert loaded.revokes(Caller.from_der(job.public_bytes(serialization.Encoding.DER)))


def _ca_without_crl_sign(directory: Path) -> Path:
    """A CA whose keyUsage allows signing certificates but not CRLs."""
    from cryptography.x509.oid import NameOID

    directory.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no crl sign CA")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return directory


def test_crls_openssl_would_refuse_are_refused_at_load(own_pki: Pki, tmp_path: Path) -> None:
    """Loaded, each would make OpenSSL refuse every client certificate of the CA while the
    broker looked ready."""
    hour = dt.timedelta(hours=1)
    no_crl_sign = _ca_without_crl_sign(tmp_path / "nocrlsign")
    path = tmp_path / "a.crl"
    path.write_bytes(signed_crl(no_crl_sign, [], last_update=_now() - hour, next_update=_now() + hour))
    with pytest.raises(CertError, match="may not sign CRLs \\(its keyUsage lacks cRLSign\\)"):
        load_client_crl(path, no_crl_sign / "ca.pem")

    ca = x509.load_pem_x509_certificate(own_pki.ca.read_bytes())
    key = serialization.load_pem_private_key((own_pki.dir / "ca.key").read_bytes(), password=None)
    delta = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(_now() - hour)
             .next_update(_now() + hour).add_extension(x509.DeltaCRLIndicator(7), critical=True)
             .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    path.write_bytes(delta.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CertError, match="is a delta CRL; give the complete CRL"):
        load_client_crl(path, own_pki.ca)

    good = signed_crl(own_pki.dir, [], last_update=_now() - hour, next_update=_now() + hour)
    path.write_bytes(good + own_pki.ca.read_bytes())  # a certificate pasted after the CRL
    with pytest.raises(CertError, match="holds a CERTIFICATE block; it must hold only CRLs"):
        load_client_crl(path, own_pki.ca)
    path.write_bytes(good)
    assert load_client_crl(path, own_pki.ca).revoked == frozenset()


async def test_an_older_crl_is_refused_at_reload_and_dropped_entries_are_logged(
        crl_brokers: BrokerFactory, own_pki: Pki, log_lines: list[str]) -> None:
    """Put back by mistake, an older CRL would un-revoke everything revoked since."""
    hour = dt.timedelta(hours=1)
    revoked = serial_of(own_pki.pair("job-other")[0])
    crl = own_pki.dir / "numbered.crl"
    crl.write_bytes(signed_crl(own_pki.dir, [revoked], last_update=_now() - hour, next_update=_now() + hour, number=7))
    b = await crl_brokers.start(server_extra=crl_setting(crl))
    assert any(line.startswith("INFO broker.service client_crl path=") and "revoked_certificates=1" in line
               and "next_update=" in line for line in log_lines), "the CRL in force is logged at start"

    crl.write_bytes(signed_crl(own_pki.dir, [], last_update=_now() - hour, next_update=_now() + hour, number=6))
    b.broker.reload_tls()
    assert any("tls_reload_failed" in line and "is older than the CRL in force (CRLNumber 6 < 7)" in line
               for line in log_lines)
    assert b.broker.tls_context.crl is not None and len(b.broker.tls_context.crl.revoked) == 1, "still in force"
    with pytest.raises(SSL.Error, match="certificate revoked"):
        await asyncio.to_thread(_fetch_with, _openssl_client(own_pki, "TLS_AES_128_GCM_SHA256", name="job-other"),
                                b.broker.api_port)

    crl.write_bytes(signed_crl(own_pki.dir, [], last_update=_now() - hour, next_update=_now() + hour, number=8))
    b.broker.reload_tls()  # newer, but without the entry: accepted, and said
    assert any("client_crl_unrevoked count=1" in line for line in log_lines)
    assert (await b.request("GET", "/v1/whoami", cert="job-other"))[0] == 200
    await assert_still_serving(b)
