"""broker.certs: the dev PKI's files, modes, extensions and refusals."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.certs import fingerprint_sha256, init_ca_and_server, issue_client, issue_server
from broker.errors import CertError
from tests.processes import run_process


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ext(cert: x509.Certificate, cls: type) -> object:
    return cert.extensions.get_extension_for_class(cls)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    init_ca_and_server(d)
    return d


def test_init_writes_files_with_modes(tmp_path: Path) -> None:
    d = tmp_path / "new" / "certs"
    paths = init_ca_and_server(d)
    assert paths == {n: d / n for n in ("ca.pem", "ca.key", "server.pem", "server.key")}
    assert sorted(p.name for p in d.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]
    assert mode(d) == 0o700
    assert mode(d / "ca.key") == 0o600
    assert mode(d / "server.key") == 0o600
    assert mode(d / "ca.pem") == 0o644
    assert mode(d / "server.pem") == 0o644


def test_key_modes_ignore_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        init_ca_and_server(tmp_path / "c")
        issue_client(tmp_path / "c", "job")
    finally:
        os.umask(old)
    for name in ("ca.key", "server.key", "job.key"):
        assert mode(tmp_path / "c" / name) == 0o600
    assert mode(tmp_path / "c") == 0o700


def test_existing_dir_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    init_ca_and_server(tmp_path)
    assert mode(tmp_path) == 0o755


def test_ca_extensions(pki: Path) -> None:
    ca = load(pki / "ca.pem")
    bc = ext(ca, x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ext(ca, x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    ski = ext(ca, x509.SubjectKeyIdentifier).value
    assert ext(ca, x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert ca.subject == ca.issuer


def test_server_cert(pki: Path) -> None:
    ca, server = load(pki / "ca.pem"), load(pki / "server.pem")
    server.verify_directly_issued_by(ca)
    san = ext(server, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(ext(server, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    bc = ext(server, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    assert ext(server, x509.AuthorityKeyIdentifier).value.key_identifier == (
        ext(ca, x509.SubjectKeyIdentifier).value.digest
    )
    assert server.public_key().curve.name == "secp256r1"
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert dt.timedelta(days=825) <= lifetime <= dt.timedelta(days=825, minutes=10)


def test_custom_hosts(tmp_path: Path) -> None:
    init_ca_and_server(tmp_path, hosts=["broker.internal", "10.0.0.5"], days=30)
    server = load(tmp_path / "server.pem")
    san = ext(server, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.internal"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "broker.internal"


@pytest.mark.parametrize("hosts", [[], ["bad host"], ["bücher.example"]])
def test_bad_hosts(tmp_path: Path, hosts: list[str]) -> None:
    with pytest.raises(CertError):
        init_ca_and_server(tmp_path / "c", hosts=hosts)
    assert not (tmp_path / "c").exists()


def test_init_refuses_overwrite(pki: Path) -> None:
    before = (pki / "ca.key").read_bytes()
    with pytest.raises(CertError) as err:
        init_ca_and_server(pki)
    assert str(pki / "ca.pem") in str(err.value)
    assert "--force" in str(err.value)
    assert (pki / "ca.key").read_bytes() == before


def test_init_refuses_when_any_one_file_exists(tmp_path: Path) -> None:
    (tmp_path / "server.pem").write_text("mine")
    with pytest.raises(CertError, match=r"server\.pem already exists; pass --force") as err:
        init_ca_and_server(tmp_path)
    assert "new CA" in str(err.value) and "stops being trusted" in str(err.value), "--force replaces the CA: say so"
    assert (tmp_path / "server.pem").read_text() == "mine"
    assert not (tmp_path / "ca.key").exists()


def test_init_force_replaces(pki: Path) -> None:
    old = load(pki / "ca.pem")
    (pki / "ca.key").chmod(0o644)  # a wider mode on the old file must not survive
    init_ca_and_server(pki, force=True)
    assert load(pki / "ca.pem").serial_number != old.serial_number
    assert mode(pki / "ca.key") == 0o600
    assert not [p for p in pki.iterdir() if p.name.endswith(".tmp")]


def test_issue_server_rotates_with_same_ca(pki: Path) -> None:
    ca_before = (pki / "ca.pem").read_bytes()
    old = load(pki / "server.pem")
    with pytest.raises(CertError, match=r"server\.pem already exists; pass --force"):
        issue_server(pki)
    cert_path, key_path = issue_server(pki, hosts=["broker.internal"], force=True)
    assert (cert_path, key_path) == (pki / "server.pem", pki / "server.key")
    new = load(cert_path)
    assert new.serial_number != old.serial_number
    new.verify_directly_issued_by(load(pki / "ca.pem"))
    assert (pki / "ca.pem").read_bytes() == ca_before
    assert mode(key_path) == 0o600
    san = ext(new, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.internal"]


def test_issue_server_keeps_current_hosts(tmp_path: Path) -> None:
    init_ca_and_server(tmp_path, hosts=["10.0.0.5", "broker.internal"])
    issue_server(tmp_path, force=True)
    new = load(tmp_path / "server.pem")
    san = ext(new, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.internal"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert new.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "10.0.0.5"


def test_issue_server_needs_ca(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="run `broker certs init --dir"):
        issue_server(tmp_path)


def test_client_cert(pki: Path) -> None:
    cert_path, key_path = issue_client(
        pki, "job-123", uris=["spiffe://ci.example/runner/1"], dns=["runner1.example"]
    )
    assert (cert_path, key_path) == (pki / "job-123.pem", pki / "job-123.key")
    assert mode(key_path) == 0o600 and mode(cert_path) == 0o644
    cert = load(cert_path)
    cert.verify_directly_issued_by(load(pki / "ca.pem"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "job-123"
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://ci.example/runner/1"]
    assert san.get_values_for_type(x509.DNSName) == ["runner1.example"]
    assert not ext(cert, x509.BasicConstraints).value.ca
    assert ext(cert, x509.KeyUsage).value.digital_signature
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=365) <= lifetime <= dt.timedelta(days=365, minutes=10)


def test_client_without_sans_has_no_san_extension(pki: Path) -> None:
    cert = load(issue_client(pki, "ops")[0])
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_client_eku_variants(pki: Path) -> None:
    server_only = load(issue_client(pki, "srv", eku="server")[0])
    assert list(ext(server_only, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    none = load(issue_client(pki, "noeku", eku="none")[0])
    with pytest.raises(x509.ExtensionNotFound):
        none.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    with pytest.raises(CertError, match="invalid eku 'both'"):
        issue_client(pki, "x", eku="both")


def test_client_validity_overrides(pki: Path) -> None:
    start = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    end = dt.datetime(2020, 1, 2)  # naive: taken as UTC
    cert = load(issue_client(pki, "old", not_before=start, not_after=end)[0])
    assert cert.not_valid_before_utc == start
    assert cert.not_valid_after_utc == end.replace(tzinfo=dt.timezone.utc)
    with pytest.raises(CertError, match="must be after not_before"):
        issue_client(pki, "backwards", not_before=end, not_after=start)


def test_client_never_outlives_ca(tmp_path: Path) -> None:
    init_ca_and_server(tmp_path, days=10)
    cert = load(issue_client(tmp_path, "job", days=365)[0])
    assert cert.not_valid_after_utc == load(tmp_path / "ca.pem").not_valid_after_utc


@pytest.mark.parametrize(
    "name", ["", "-job", ".hidden", "../evil", "a/b", "job 1", "jöb", "ca", "server", "x\n"]
)
def test_bad_client_names(pki: Path, name: str) -> None:
    before = sorted(p.name for p in pki.iterdir())
    with pytest.raises(CertError, match="invalid client name"):
        issue_client(pki, name)
    assert sorted(p.name for p in pki.iterdir()) == before


@pytest.mark.parametrize("name", ["job-123", "A.b_c-1", "7"])
def test_good_client_names(pki: Path, name: str) -> None:
    assert issue_client(pki, name)[0].name == f"{name}.pem"


@pytest.mark.parametrize("uri", ["no-scheme", "spiffe://a b", ""])
def test_bad_uri(pki: Path, uri: str) -> None:
    with pytest.raises(CertError, match="invalid URI"):
        issue_client(pki, "job", uris=[uri])
    assert not (pki / "job.pem").exists()


def test_client_refuses_overwrite(pki: Path) -> None:
    issue_client(pki, "job")
    with pytest.raises(CertError, match=r"job\.pem already exists; pass --force"):
        issue_client(pki, "job")
    issue_client(pki, "job", force=True)


def test_client_needs_ca(tmp_path: Path) -> None:
    with pytest.raises(CertError) as err:
        issue_client(tmp_path, "job")
    assert f"run `broker certs init --dir {tmp_path}` first" in str(err.value)
    assert str(tmp_path / "ca.pem") in str(err.value)
    assert not (tmp_path / "job.pem").exists()


def test_client_with_mismatched_ca_key(tmp_path: Path) -> None:
    init_ca_and_server(tmp_path / "a")
    init_ca_and_server(tmp_path / "b")
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(CertError, match=r"ca\.key does not match"):
        issue_client(tmp_path / "a", "job")


def test_client_with_garbage_ca(pki: Path) -> None:
    (pki / "ca.pem").write_text("not a cert")
    with pytest.raises(CertError, match=r"ca\.pem: not a PEM certificate"):
        issue_client(pki, "job")


def test_fingerprint() -> None:
    assert fingerprint_sha256(b"") == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


@pytest.mark.parametrize("days, message", [(0, "days must be at least 1, got 0"),
                                           (99999999, "days must be at most 36500, got 99999999")])
async def test_broker_certs_client_days_out_of_range_is_one_line_exit_2(tmp_path: Path, days: int,
                                                                        message: str) -> None:
    init_ca_and_server(tmp_path)
    ran = await run_process([sys.executable, "-m", "broker", "certs", "client", "job", "--dir", str(tmp_path),
                             "--days", str(days)], env=dict(os.environ))
    assert ran.code == 2 and ran.out == "" and ran.err.strip() == f"broker certs: {message}", ran
    assert not (tmp_path / "job.pem").exists()
