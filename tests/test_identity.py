"""broker.identity: identities from real certs (getpeercert dict and DER) and pattern matching."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from broker.certs import init_ca_and_server, issue_client
from broker.errors import CertError
from broker.identity import (
    Caller,
    identities_from_der,
    identities_from_peercert,
    matches,
    pattern_problem,
)

EXPECTED = (
    "cn:job-7",
    "uri:spiffe://ci.example/runner/1",
    "uri:spiffe://ci.example/job/7",
    "dns:runner1.example",
)


@pytest.fixture(scope="module")
def job_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_ca_and_server(d)
    cert, _ = issue_client(
        d,
        "job-7",
        uris=["spiffe://ci.example/runner/1", "spiffe://ci.example/job/7"],
        dns=["runner1.example"],
    )
    return cert


def peercert_dict(path: Path) -> dict:
    # The same decoder getpeercert() uses, without needing a handshake (tests/test_tls.py
    # checks the real handshake gives the same identities).
    return ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]


def der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


def test_from_peercert_of_real_cert(job_cert: Path) -> None:
    assert identities_from_peercert(peercert_dict(job_cert)) == EXPECTED


def test_from_der_of_real_cert(job_cert: Path) -> None:
    assert identities_from_der(der(job_cert)) == EXPECTED


def test_cn_only_cert(tmp_path: Path) -> None:
    init_ca_and_server(tmp_path)
    cert, _ = issue_client(tmp_path, "ops-1")
    assert identities_from_peercert(peercert_dict(cert)) == ("cn:ops-1",)
    assert identities_from_der(der(cert)) == ("cn:ops-1",)


def test_server_cert_ignores_ip_sans(tmp_path: Path) -> None:
    init_ca_and_server(tmp_path)
    server = tmp_path / "server.pem"
    expected = ("cn:localhost", "dns:localhost")
    assert identities_from_peercert(peercert_dict(server)) == expected
    assert identities_from_der(der(server)) == expected


def test_peercert_shapes() -> None:
    peercert = {
        "subject": (
            (("countryName", "DE"),),
            (("commonName", "a"), ("organizationName", "x")),  # multi-valued RDN
            (("commonName", "b"),),
        ),
        "subjectAltName": (
            ("email", "x@example"),
            ("DNS", "h.example"),
            ("IP Address", "127.0.0.1"),
            ("URI", "spiffe://t/1"),
            ("DNS", "h.example"),  # duplicate
            ("othername", "<unsupported>"),
        ),
    }
    assert identities_from_peercert(peercert) == ("cn:a", "cn:b", "dns:h.example", "uri:spiffe://t/1")


@pytest.mark.parametrize("empty", [None, {}, {"subject": ()}])
def test_peercert_empty(empty: dict | None) -> None:
    assert identities_from_peercert(empty) == ()


def test_der_garbage() -> None:
    with pytest.raises(CertError, match="cannot parse client certificate"):
        identities_from_der(b"\x30\x03junk")


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (["cn:job-7"], True),
        (["cn:job-*"], True),
        (["cn:job-?"], True),
        (["cn:job-[0-9]"], True),
        (["cn:JOB-7"], False),  # case-sensitive
        (["cn:job"], False),  # whole value, not a prefix
        (["uri:spiffe://ci.example/runner/*"], True),
        (["uri:spiffe://ci.example/*/7"], True),
        (["uri:spiffe://other/*"], False),
        (["dns:*.example"], True),
        (["cn:ops-*", "dns:runner1.example"], True),  # any pattern
        (["cn:ops-*", "uri:spiffe://other/*"], False),
    ],
)
def test_matches(patterns: list[str], expected: bool) -> None:
    assert matches(EXPECTED, patterns) is expected


@pytest.mark.parametrize(
    "pattern",
    [
        "cn:spiffe://ci.example/*",  # right value, wrong kind
        "dns:job-7",
        "*",  # no kind: never a wildcard over kinds
        "*:job-7",
        "*:*",
        "?n:job-7",
        "cn*",
        "uri*",
        "CN:job-7",  # kinds are lower case, literally
        "job-7",
        "",
    ],
)
def test_kind_is_literal(pattern: str) -> None:
    assert matches(EXPECTED, [pattern]) is False


def test_cn_star_does_not_match_other_kinds() -> None:
    assert matches(["uri:spiffe://x", "dns:h"], ["cn:*"]) is False
    assert matches(["cn:x"], ["cn:*"]) is True


def test_deny_by_default() -> None:
    assert matches(EXPECTED, []) is False
    assert matches([], ["cn:*"]) is False
    assert matches([], []) is False


def test_accepts_iterators() -> None:
    assert matches(iter(EXPECTED), iter(["dns:runner1.example"])) is True


def test_identity_with_colon_in_value() -> None:
    assert matches(["cn:a:b"], ["cn:a:*"]) is True
    assert matches(["cn:a:b"], ["a:b"]) is False


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("cn:job-*", None),
        ("uri:spiffe://x/*", None),
        ("dns:*", None),
        ("job-*", "must start with one of cn:, uri:, dns:"),
        ("ip:127.0.0.1", "must start with one of"),
        ("cn:", "has nothing after 'cn:'"),
    ],
)
def test_pattern_problem(pattern: str, problem: str | None) -> None:
    result = pattern_problem(pattern)
    if problem is None:
        assert result is None
    else:
        assert result is not None and problem in result


def test_identity_module_is_pure() -> None:
    import broker.identity as mod

    source = Path(mod.__file__).read_text()
    for banned in ("aiohttp", "hvac", "prometheus_client"):
        assert f"import {banned}" not in source and f"from {banned}" not in source


def test_a_malformed_san_extension_is_refused_not_read_as_no_sans() -> None:
    """Read as 'no SANs', a certificate would quietly lose its uri:/dns: identities."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtensionOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "job")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x86\x01"),
                           critical=False)
            .sign(key, hashes.SHA256()))
    der = cert.public_bytes(Encoding.DER)
    with pytest.raises(CertError, match="cannot parse client certificate extensions"):
        identities_from_der(der)
    with pytest.raises(CertError):
        Caller.from_der(der)
