"""Development PKI: one ECDSA P-256 CA that signs the broker's server cert and the client certs.

Made with ``cryptography`` only, so ``broker certs`` and ``broker dev`` need no openssl binary.
The CA that signs ``server.pem`` is also the one the broker trusts for client certs
(``client_ca = ca.pem``): one file for jobs to trust, one key to guard.

Private keys are created 0600 from the first byte (``os.open`` with the mode, then an atomic
rename), so they are never briefly readable by others, and a crash never leaves half a key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import CertError
from broker.files import write_atomic

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_CN = "token broker dev CA"
CLIENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Client names become file names next to the CA; these would overwrite the PKI itself.
RESERVED_NAMES = frozenset({"ca", "server"})
EKU_CHOICES = {
    "client": (ExtendedKeyUsageOID.CLIENT_AUTH,),
    "server": (ExtendedKeyUsageOID.SERVER_AUTH,),
    "none": None,
}
# Backdate validity a little so a client whose clock is slightly behind still accepts a fresh cert.
CLOCK_SKEW = dt.timedelta(minutes=5)

KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700


def fingerprint_sha256(der: bytes) -> str:
    """Lower-case hex SHA-256 of a DER certificate (what ``openssl x509 -fingerprint`` shows)."""
    return hashlib.sha256(der).hexdigest()


def init_ca_and_server(
    dir: Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    force: bool = False,
    days: int = 825,
) -> dict[str, Path]:
    """Write ``ca.pem ca.key server.pem server.key`` into ``dir``; returns {file name: path}.

    ``days`` is 825 by default, the longest validity clients such as macOS accept for a TLS
    server cert. Refuses to overwrite any existing file unless ``force``.
    """
    dir = Path(dir)
    _check_days(days)
    sans = _server_sans(hosts)
    paths = {name: dir / name for name in ("ca.pem", "ca.key", "server.pem", "server.key")}
    if not force:
        _refuse_existing(paths.values(), _NEW_CA)

    now = _now()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_CN)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key, server_cert = _sign_server(ca_cert, ca_key, hosts[0], sans, days)

    _ensure_dir(dir)
    _write_key(paths["ca.key"], ca_key)
    _write_cert(paths["ca.pem"], ca_cert)
    _write_key(paths["server.key"], server_key)
    _write_cert(paths["server.pem"], server_cert)
    return paths


def issue_server(
    dir: Path,
    hosts: Sequence[str] | None = None,
    days: int = 825,
    force: bool = False,
) -> tuple[Path, Path]:
    """A fresh ``server.pem server.key`` signed by the existing ``dir/ca.pem``: rotation.

    Clients keep trusting the same ``ca.pem``, so after this a ``kill -HUP`` of the broker
    is all a rotation takes. ``hosts`` defaults to the SANs of the current ``server.pem``
    (or localhost, 127.0.0.1, ::1). Refuses to overwrite unless ``force``.
    """
    dir = Path(dir)
    _check_days(days)
    cert_path, key_path = dir / "server.pem", dir / "server.key"
    if not force:
        _refuse_existing((cert_path, key_path))
    if hosts is None:
        hosts = _current_hosts(cert_path) or DEFAULT_HOSTS
    sans = _server_sans(hosts)
    ca_cert, ca_key = load_ca(dir)
    key, cert = _sign_server(ca_cert, ca_key, hosts[0], sans, days)
    # The key goes first; a broker reloading in between sees a key that does not match the
    # cert, refuses the reload and keeps serving the old pair (see broker.tls).
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def issue_client(
    dir: Path,
    name: str,
    uris: Sequence[str] = (),
    dns: Sequence[str] = (),
    days: int = 365,
    force: bool = False,
    eku: str = "client",
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Write ``NAME.pem NAME.key`` signed by ``dir/ca.pem``; returns (cert path, key path).

    ``eku`` is ``client`` (clientAuth, what the broker requires), or for tests ``server``
    (serverAuth only) or ``none`` (no extendedKeyUsage extension). ``not_before`` /
    ``not_after`` override the validity window (naive datetimes are taken as UTC).
    """
    dir = Path(dir)
    if not CLIENT_NAME_RE.fullmatch(name):
        raise CertError(
            f"invalid client name {name!r}: use letters, digits, '_', '.', '-' "
            "and start with a letter or digit"
        )
    if name in RESERVED_NAMES:
        raise CertError(f"invalid client name {name!r}: {name}.pem is part of the CA and server files")
    if eku not in EKU_CHOICES:
        raise CertError(f"invalid eku {eku!r}: choose one of {', '.join(EKU_CHOICES)}")
    _check_days(days)
    cert_path, key_path = dir / f"{name}.pem", dir / f"{name}.key"
    if not force:
        _refuse_existing((cert_path, key_path))
    ca_cert, ca_key = load_ca(dir)

    now = _now()
    start = _utc(not_before) if not_before is not None else now - CLOCK_SKEW
    if not_after is not None:
        end = _utc(not_after)
    else:
        # A client cert outliving its CA would fail anyway; make its stated expiry honest.
        end = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if end <= start:
        raise CertError(f"not_after ({end.isoformat()}) must be after not_before ({start.isoformat()})")

    sans: list[x509.GeneralName] = []
    for uri in uris:
        sans.append(_uri_san(uri))
    for host in dns:
        sans.append(_dns_san(host))

    key = ec.generate_private_key(ec.SECP256R1())
    builder = _leaf_builder(ca_cert, key, name, start, end)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    usages = EKU_CHOICES[eku]
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())

    _ensure_dir(dir)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


CRL_NAME = "ca.crl"


def revoke_clients(dir: Path, names: Sequence[str] = (), days: int = 30,
                   now: dt.datetime | None = None) -> tuple[Path, int]:
    """Write ``dir/ca.crl``, signed by the CA in ``dir``, listing the client certificates
    ``NAME.pem`` in ``dir`` and every certificate an earlier ``ca.crl`` there listed; valid
    for ``days``. No names: the same list with new dates (a CRL must be renewed before its
    nextUpdate, or a broker using it refuses every client). Returns (path, how many listed)."""
    dir = Path(dir)
    _check_days(days)
    ca_cert, ca_key = load_ca(dir)
    crl_path = dir / CRL_NAME
    earlier = _earlier_crl(crl_path, ca_cert)
    listed = {entry.serial_number: entry.revocation_date_utc for entry in earlier} if earlier is not None else {}
    now = _utc(now) if now is not None else _now()
    for name in names:
        # A name in the directory, or a path: the leaked certificate may be a copy kept
        # elsewhere, after NAME.pem was re-issued.
        cert_path = Path(name) if "/" in name or name.endswith(".pem") else dir / f"{name}.pem"
        cert = load_cert(cert_path)
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise CertError(f"{cert_path} was not issued by the CA in {dir / 'ca.pem'}") from None
        listed.setdefault(cert.serial_number, now)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca_cert.subject)
               .last_update(now - CLOCK_SKEW)
               .next_update(now + dt.timedelta(days=days))
               .add_extension(x509.CRLNumber(_next_crl_number(earlier, now)), critical=False))
    for serial, when in sorted(listed.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    crl = builder.sign(ca_key, hashes.SHA256())
    _write_atomic(crl_path, crl.public_bytes(serialization.Encoding.PEM), CERT_MODE)
    return crl_path, len(listed)


def _next_crl_number(earlier: x509.CertificateRevocationList | None, now: dt.datetime) -> int:
    """Increasing, as RFC 5280 asks, even for two CRLs written within one second."""
    number = int(now.timestamp())
    if earlier is not None:
        try:
            number = max(number, earlier.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1)
        except x509.ExtensionNotFound:
            pass
    return number


def _earlier_crl(path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList | None:
    if not path.exists():
        return None
    try:
        crl = x509.load_pem_x509_crl(_read(path))
    except ValueError:
        raise CertError(f"{path} is not a PEM CRL; move it away to start a new one") from None
    if not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise CertError(f"{path} is not signed by the CA in this directory; move it away to start a new one")
    return crl


def load_ca(dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA cert and key in ``dir``; CertError naming the file if missing, bad or mismatched."""
    dir = Path(dir)
    cert_path, key_path = dir / "ca.pem", dir / "ca.key"
    for path in (cert_path, key_path):
        if not path.exists():
            raise CertError(f"{path} not found: run `broker certs init --dir {dir}` first")
    cert = load_cert(cert_path)
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{key_path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key_path}: expected an EC private key")
    if key.public_key() != cert.public_key():
        raise CertError(f"{key_path} does not match the certificate in {cert_path}")
    return cert, key


def load_cert(path: Path) -> x509.Certificate:
    """The first certificate in a PEM file; CertError naming the file if it cannot be read."""
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        raise CertError(f"{path}: not a PEM certificate ({exc})") from None


# --- building blocks ---------------------------------------------------------------------


def _sign_server(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    cn: str,
    sans: list[x509.GeneralName],
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _leaf_builder(ca_cert, key, cn, now - CLOCK_SKEW, not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _current_hosts(cert_path: Path) -> tuple[str, ...]:
    """DNS and IP SANs of an existing server cert, CN first as init wrote it; () if none."""
    if not cert_path.exists():
        return ()
    cert = load_cert(cert_path)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    hosts = [str(v) for v in san.get_values_for_type(x509.DNSName)]
    hosts += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns and cns[0] in hosts:  # keep the subject CN the same
        hosts.remove(cns[0])
        hosts.insert(0, str(cns[0]))
    return tuple(hosts)


def _server_sans(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if not hosts:
        raise CertError("the server certificate needs at least one host name or IP address")
    return [_host_san(h) for h in hosts]


MAX_DAYS = 36500  # a hundred years: any more overflows the dates a certificate can carry


def _check_days(days: int) -> None:
    if days < 1:
        raise CertError(f"days must be at least 1, got {days}")
    if days > MAX_DAYS:
        raise CertError(f"days must be at most {MAX_DAYS}, got {days}")


def _leaf_builder(
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    cn: str,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _host_san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return _dns_san(host)


def _dns_san(host: str) -> x509.GeneralName:
    # Checked here because cryptography accepts any str and only fails (or not) at signing.
    if not host or not host.isascii() or any(c.isspace() for c in host):
        raise CertError(f"invalid DNS name {host!r}: use an ASCII (punycode) host name")
    return x509.DNSName(host)


def _uri_san(uri: str) -> x509.GeneralName:
    if ":" not in uri or not uri.isascii() or any(c.isspace() for c in uri):
        raise CertError(f"invalid URI {uri!r}: expected an ASCII URI such as spiffe://ci.example/runner/1")
    return x509.UniformResourceIdentifier(uri)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _refuse_existing(paths: Iterable[Path], consequence: str = "") -> None:
    for path in paths:
        if path.exists():
            raise CertError(f"{path} already exists; pass --force to overwrite it{consequence}")


# Said when init would overwrite: --force there replaces the CA, which is easy to miss.
_NEW_CA = ("; that makes a new CA, and every certificate the old one signed stops being trusted "
           "(to renew only the server certificate, see certs/README.md)")


def _ensure_dir(dir: Path) -> None:
    if dir.is_dir():
        return
    dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        dir.mkdir(mode=DIR_MODE)
    except FileExistsError:
        if not dir.is_dir():
            raise CertError(f"{dir} exists and is not a directory") from None
        return
    except OSError as exc:
        raise CertError(f"cannot create {dir}: {exc.strerror}") from None
    os.chmod(dir, DIR_MODE)  # mkdir's mode is filtered by the umask; make it exact


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertError(f"cannot read {path}: {exc.strerror}") from None


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(path, pem, KEY_MODE)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """``broker.files.write_atomic``, with the failure as a CertError naming the file."""
    try:
        write_atomic(path, data, mode)
    except OSError as exc:
        raise CertError(f"cannot write {path}: {exc.strerror}") from None
