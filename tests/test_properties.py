"""Property tests (Hypothesis) for the pure parsers: durations, identities, allow patterns."""

from __future__ import annotations

import datetime as dt
from fnmatch import fnmatchcase

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.config import format_duration, parse_duration
from broker.identity import identities_from_der, matches

UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}


@st.composite
def duration_texts(draw: st.DrawFn) -> tuple[str, float]:
    """A well-formed duration (units largest first, each once) and its value in seconds."""
    chosen = draw(st.lists(st.sampled_from(list(UNITS)), min_size=1, max_size=5, unique=True))
    chosen.sort(key=list(UNITS).index)
    parts, total = [], 0.0
    for unit in chosen:
        amount = draw(st.integers(min_value=0, max_value=10_000))
        parts.append(f"{amount}{unit}")
        total += amount * UNITS[unit]
    return "".join(parts), total


@given(duration_texts())
def test_well_formed_durations_parse_to_their_value(case: tuple[str, float]) -> None:
    text, seconds = case
    assert abs(parse_duration(text) - seconds) < 1e-6


@given(st.integers(min_value=0, max_value=10**7))
def test_format_duration_round_trips(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.text(max_size=30))
def test_any_text_either_parses_to_a_non_negative_number_or_fails_with_a_sentence(text: str) -> None:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        message = str(exc)
        assert message and "\n" not in message and ("duration" in message or "negative" in message)
    else:
        assert value >= 0


_KEY = ec.generate_private_key(ec.SECP256R1())
_NAME_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0x2FFF, exclude_categories=("Cs",))


def _cert(cn: str, uris: list[str], dns: list[str]) -> bytes:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")]))
        .public_key(_KEY.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


_uri = st.from_regex(r"spiffe://[a-z0-9.-]{1,20}(/[A-Za-z0-9._-]{1,10}){0,3}", fullmatch=True)
_dns = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]{1,8}){0,2}", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(st.text(_NAME_CHARS, min_size=1, max_size=21), st.lists(_uri, max_size=3, unique=True),
       st.lists(_dns, max_size=3, unique=True))
def test_identities_are_exactly_the_cn_and_san_entries(cn: str, uris: list[str], dns: list[str]) -> None:
    identities = identities_from_der(_cert(cn, uris, dns))
    assert identities[0] == f"cn:{cn}"
    assert list(identities[1:]) == [f"uri:{u}" for u in uris] + [f"dns:{d}" for d in dns]


_kind = st.sampled_from(["cn", "uri", "dns"])
_value = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20)
_glob = st.text(st.sampled_from(list("ab-/.*?")), min_size=1, max_size=8)


@given(_kind, _value)
def test_an_identity_always_matches_itself_and_its_kind_star(kind: str, value: str) -> None:
    identity = f"{kind}:{value}"
    literal = "".join(f"[{c}]" if c in "*?[" else c for c in value)
    assert matches([identity], [f"{kind}:{literal}"])
    assert matches([identity], [f"{kind}:*"])


@given(_kind, _kind, _value, _glob)
def test_a_pattern_never_crosses_kinds_and_agrees_with_fnmatch(kind: str, other: str, value: str, glob: str) -> None:
    identity = f"{kind}:{value}"
    if other != kind:
        assert not matches([identity], [f"{other}:*"])
    assert matches([identity], [f"{kind}:{glob}"]) == fnmatchcase(value, glob)


@given(st.lists(st.tuples(_kind, _value), max_size=4))
def test_deny_by_default(identities: list[tuple[str, str]]) -> None:
    assert not matches([f"{k}:{v}" for k, v in identities], [])
    assert not matches([f"{k}:{v}" for k, v in identities], ["*", "job-*", ""])
