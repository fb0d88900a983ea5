"""Configuration: TOML (parsed with ``tomllib``) into frozen dataclasses, validated in one pass.

Durations are strings like ``"90s"``, ``"15m"``, ``"1h"`` and become float seconds here.
Relative paths are resolved against the directory of the config file.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.errors import ConfigError, url_without_secrets

DEFAULT_CIPHERSUITES = ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")
TLS13_CIPHERSUITES = (
    "TLS_AES_256_GCM_SHA384",
    "TLS_AES_128_GCM_SHA256",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_CCM_SHA256",
    "TLS_AES_128_CCM_8_SHA256",
)
ROTATION_JITTER = 0.1  # rotation fires within ± this fraction of rotate_after (DESIGN §6.2)
# Upper bounds of numeric settings: far beyond any real use, well inside what the code handles.
MAX_DURATION = 366 * 86400.0
MAX_DURATION_TEXT = "366 days"
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_RATE_LIMIT = 100_000.0
MAX_RATE_LIMIT_BURST = 1_000_000.0
MAX_ALERT_THRESHOLD = 1000
MAX_FAMILIES_PER_CLIENT = 100_000
# Vault takes a TTL in whole seconds and reads 0 as "the role's default", so no token is minted
# with less than this left; a per-job family must last at least this long.
MIN_TOKEN_TTL = 1.0
# A Vault call that takes longer is not coming back: waiting holds a worker thread, a rotation,
# a job's request.
MAX_VAULT_TIMEOUT = 300.0


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    cert: Path
    key: Path
    client_ca: Path
    tls13_ciphersuites: tuple[str, ...] = DEFAULT_CIPHERSUITES
    client_crl: Path | None = None  # PEM CRLs of client_ca's CAs; a listed client cert is refused
    max_body_bytes: int = 64 * 1024
    handshake_timeout: float = 10.0
    revoke_on_shutdown: bool = False  # default: running jobs keep their tokens across a restart
    tls_engine: str = "openssl"  # openssl (pyOpenSSL, enforces tls13_ciphersuites) | stdlib
    rate_limit: float = 50.0  # requests per second per client certificate; 0 turns it off
    rate_limit_burst: float = 100.0


@dataclass(frozen=True)
class OpsConfig:
    host: str = "127.0.0.1"
    port: int = 9090


AUDIT_ON_FAILURE = ("refuse", "continue")
TLS_ENGINES = ("openssl", "stdlib")


@dataclass(frozen=True)
class AuditConfig:
    path: Path
    on_failure: str = "refuse"  # refuse: no token is handed out that cannot be audited


@dataclass(frozen=True)
class StateConfig:
    dir: Path


@dataclass(frozen=True)
class AuthConfig:
    """One ``[[vault.auth]]`` entry; which fields are set depends on ``method``."""

    method: str  # token | approle | cert
    mount: str = ""  # auth mount path; "" means the method's default ("approle", "cert")
    token_file: Path | None = None
    token_env: str | None = None
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    cert_role: str | None = None
    rotate_secret_id: float | None = None  # approle: mint a fresh secret_id this often; None = never


@dataclass(frozen=True)
class VaultConfig:
    address: str
    auth: tuple[AuthConfig, ...]
    ca_cert: Path | None = None
    timeout: float = 5.0
    allow_plaintext: bool = False  # http:// to a host that is not loopback: tokens cross the network in clear


@dataclass(frozen=True)
class AdminConfig:
    allow: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProfileConfig:
    name: str
    token_role: str
    ttl: float
    grace: float
    rotate_after: float  # the effective value: explicit, or the default computed from ttl and grace
    allow: tuple[str, ...]
    policies: tuple[str, ...] = ()
    mode: str = "shared"  # shared | per-job
    check_interval: float = 60.0
    alert_threshold: int = 2
    reuse_interval: float = 30.0
    family_max_age: float = 24 * 3600.0
    # Live families one client certificate may hold in this profile: without a bound, one job's
    # certificate (or a thief's copy) could mint Vault tokens until Vault's storage fills.
    max_families_per_client: int = 100


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    ops: OpsConfig
    audit: AuditConfig
    state: StateConfig
    vault: VaultConfig
    admin: AdminConfig
    profiles: dict[str, ProfileConfig] = field(default_factory=dict)
    source: Path | None = None  # the file this was loaded from


# --- durations --------------------------------------------------------------------------------

_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_UNIT_RANK = {unit: rank for rank, unit in enumerate(_DURATION_UNITS)}
# "ms" must come before "m" in the alternation, or "500ms" would read as 500m + garbage.
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|d|h|m|s)")
_PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_DURATION_HINT = "use a number with a unit, like 90s, 15m or 1h"


def parse_duration(text: str | int | float) -> float:
    """``"90s"``, ``"15m"``, ``"1h30m"``, ``"500ms"``, ``"2d"``, or plain seconds → seconds."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"{_shown(text)} is not a duration; {_DURATION_HINT}")
    if not isinstance(text, str):
        if not math.isfinite(text):
            raise ValueError(f"{text} is not a duration; {_DURATION_HINT}")
        if text < 0:
            raise ValueError(f"{text} is negative; durations must be 0 or more")
        return float(text)
    spec = text.strip()
    if not spec:
        raise ValueError(f"an empty string is not a duration; {_DURATION_HINT}")
    if spec.startswith("-"):
        raise ValueError(f"{_shown(text)} is negative; durations must be 0 or more")
    if _PLAIN_NUMBER.fullmatch(spec):
        return float(spec)
    total, pos, last_rank = 0.0, 0, -1
    while pos < len(spec):
        part = _DURATION_PART.match(spec, pos)
        # Units must run from largest to smallest, each once: "30m1h" or "1h1h" is a typo.
        if part is None or _UNIT_RANK[part[2]] <= last_rank:
            raise ValueError(f"{_shown(text)} is not a duration; {_DURATION_HINT}")
        last_rank = _UNIT_RANK[part[2]]
        total += float(part[1]) * _DURATION_UNITS[part[2]]
        pos = part.end()
    return total


def format_duration(seconds: float) -> str:
    """Seconds → the shortest form ``parse_duration`` reads back: "40m", "1h30m", "4s", "500ms"."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    parts = [f"{hours}h"] if hours else []
    if minutes:
        parts.append(f"{minutes}m")
    if millis and not (hours or minutes or secs):
        parts.append(f"{millis}ms")
    elif millis:
        parts.append(f"{secs}.{millis:03d}".rstrip("0") + "s")
    elif secs or not parts:
        parts.append(f"{secs}s")
    return "".join(parts)


def default_rotate_after(ttl: float, grace: float) -> float:
    """When to rotate if the profile does not say: ``min(2/3 ttl, (ttl - grace - margin) / 1.1)``.

    The margin is ``min(60s, ttl/10)`` so second-scale test TTLs still work. Dividing by
    ``1 + ROTATION_JITTER`` keeps the latest jittered rotation plus grace inside the TTL, which
    ``ttl - grace - margin`` alone would not. For ttl=1h, grace=15m both terms give 40m.
    A result <= 0 means grace leaves no room for rotation.
    """
    margin = min(60.0, ttl / 10)
    return min(ttl * 2 / 3, (ttl - grace - margin) / (1 + ROTATION_JITTER))


# --- literal tokens ---------------------------------------------------------------------------

_TOKEN_VALUE = re.compile(r"(?:hvs|hvb|hvr|s|b|r)\.[A-Za-z0-9_-]{20,}")
# The same shape inside free text; used as a last line of defence on every problem message.
_TOKEN_IN_TEXT = re.compile(r"(?<![A-Za-z0-9_-])(?:hvs|hvb|hvr|s|b|r)\.[A-Za-z0-9_-]{20,}")
_LITERAL_SECRET_KEYS = {
    "token": "literal tokens are not allowed in the config; use token_file or token_env",
    "secret_id": "literal secret IDs are not allowed in the config; use secret_id_file",
    "role_id": "literal role IDs are not allowed in the config; use role_id_file",
}
_TOKEN_VALUE_PROBLEM = (
    "this value looks like a Vault token; literal tokens are not allowed in the config; "
    "use token_file or token_env"
)
_TOKEN_IN_FILE_KEY_PROBLEM = (
    "this value looks like a Vault token, not a file name; put the credential in a file of its own "
    "(mode 0600) and give that file's path here"
)
_TOKEN_IN_ENV_KEY_PROBLEM = (
    "this value looks like a Vault token, not a variable name; put the token in an environment variable "
    "and give the variable's name here"
)


def _token_value_problem(key: object) -> str:
    """What to do instead of the token-shaped value found at ``key``: the advice depends on
    what the key expects (a path, a variable name, or anything else)."""
    if isinstance(key, str) and key.endswith("_file"):
        return _TOKEN_IN_FILE_KEY_PROBLEM
    if isinstance(key, str) and key.endswith("_env"):
        return _TOKEN_IN_ENV_KEY_PROBLEM
    return _TOKEN_VALUE_PROBLEM


def looks_like_token(value: str) -> bool:
    """True for strings shaped like a Vault/OpenBao service, batch or recovery token."""
    return _TOKEN_VALUE.fullmatch(value.strip()) is not None


def redact_tokens(text: str) -> str:
    """``text`` with every token-shaped part replaced: the last line of defence for messages."""
    return _TOKEN_IN_TEXT.sub("<redacted token>", text)


# --- credentials read from files and environment variables ----------------------------------


def credential_problem(data: bytes | str, what: str) -> str | None:
    """Why ``data``, the content of a credential file or variable, is not a usable ``what``
    (token, secret_id, role_id), or None. A credential is one line of printable ASCII without
    spaces; a trailing line break is fine. The answer never repeats any of the content: a
    file that holds two tokens, or a token and a note, must not put them in a log line.
    """
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    value = raw.rstrip(b"\r\n")
    if not value.strip():
        return "is empty"
    lines = value.count(b"\n") + 1
    if lines > 1:
        return f"has {lines} lines; put only the {what} in it"
    if value.startswith(b"\xef\xbb\xbf"):
        return "starts with a byte-order mark; save it as plain text without one"
    if any(byte > 0x7E for byte in value):
        return f"contains a non-ASCII character; a {what} is plain ASCII"
    if b" " in value or b"\t" in value:
        return f"contains a space or tab; put only the {what} in it"
    if any(byte < 0x20 or byte == 0x7F for byte in value):
        return f"contains a control character; put only the {what} in it"
    # No token, secret_id or role_id has quotes; quotes come from copying a JSON or shell value,
    # and Vault would be sent them as part of the credential.
    if value[:1] in (b'"', b"'") or value[-1:] in (b'"', b"'"):
        return f"is wrapped in quotes; put only the {what} in it, without quotes"
    return None


def credential_text(data: bytes | str) -> str:
    """The credential in ``data`` once ``credential_problem`` found nothing wrong."""
    text = data.decode("ascii") if isinstance(data, bytes) else data
    return text.rstrip("\r\n")


def _shown(value: object) -> str:
    """A value quoted for a problem message, with anything token-shaped withheld."""
    if isinstance(value, str) and looks_like_token(value):
        return "<redacted token>"
    return repr(value)


def _scan_for_literal_secrets(document: dict[str, Any], problems: list[str]) -> None:
    """Report literal credentials anywhere in the document, whatever table they sit in.

    A loop over an explicit stack, not recursion: dotted keys can nest tables thousands deep.
    """
    # (value, dotted path, the key it sits under); popped in document order
    stack: list[tuple[object, str, object]] = [(document, "", None)]
    while stack:
        value, where, key = stack.pop()
        children: list[tuple[object, str, object]] = []
        if isinstance(value, dict):
            for name, item in value.items():
                path = f"{where}.{name}" if where else name
                # A table named "token" is a section or a profile, not a credential.
                if name in _LITERAL_SECRET_KEYS and not isinstance(item, dict):
                    children.append((_LITERAL_SECRET_KEYS[name], path, _REPORT))
                else:
                    children.append((item, path, name))
        elif isinstance(value, list):
            children = [(item, f"{where}[{index}]", key) for index, item in enumerate(value)]
        elif key is _REPORT:
            problems.append(f"{_clipped(where)}: {value}")
        elif isinstance(value, str) and looks_like_token(value):
            problems.append(f"{_clipped(where)}: {_token_value_problem(key)}")
        stack.extend(reversed(children))


_REPORT = object()  # marks a stack entry that is a finished problem sentence


def _clipped(where: str, limit: int = 200) -> str:
    """A key path short enough for one line; its end names the key."""
    return where if len(where) <= limit else "…" + where[-limit:]


# --- files ------------------------------------------------------------------------------------


def check_secret_file_mode(path: Path | str) -> str | None:
    """A problem sentence if group or others may access the secret file at ``path``, else None.

    A file that cannot be stat'ed gives None: existence is someone else's check.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if mode & 0o077 == 0:
        return None
    return (
        f"secret file {path} has mode {mode:04o}, so group or others can access it; "
        f"run chmod 600 {path}"
    )


def _may_be_a_secret(written: str) -> bool:
    """Whether a secret file's configured path might be the secret itself, pasted by mistake:
    tokens, secret_ids and role_ids have no '/', a PEM key has line breaks and dashes."""
    return "/" not in written or any(ch.isspace() for ch in written) or "-----" in written


def _file_problem(written: str, path: Path, secret: bool = False) -> str | None:
    """Why ``path`` (written as ``written`` in the config) is not a readable regular file.

    For a ``secret`` file's key, a value that may be the secret itself is not repeated.
    """
    where = "" if Path(written).is_absolute() else f" (resolved to {path})"
    if not path.exists():
        if secret and _may_be_a_secret(written):
            return ("no such file (the value is not shown: it may be a secret pasted in place of a path; "
                    "write a file name as ./NAME)")
        return f"file {written} does not exist{where}"
    if not path.is_file():
        return f"{written} is not a regular file{where}"
    try:
        # Opening, not os.access: it honours ACLs and effective ids the same way the server will.
        with path.open("rb"):
            pass
    except OSError as exc:
        return f"file {written} is not readable: {exc.strerror or exc}{where}"
    return None


# --- the table reader -------------------------------------------------------------------------


class _Absent:
    """Marks a value that is missing, or already reported and not to be looked at again."""


_ABSENT = _Absent()


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def _got(value: object) -> str:
    """``got a string ('64k')``; containers are described, not dumped."""
    if isinstance(value, (list, dict)):
        return f"got {_type_name(value)}"
    if isinstance(value, bool):
        return f"got a boolean ({str(value).lower()})"  # as written in TOML
    if isinstance(value, (str, int, float)):
        return f"got {_type_name(value)} ({_shown(value)})"
    return f"got {_type_name(value)} ({value})"


def _or_list(words: tuple[str, ...]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


class _Reader:
    """Reads one TOML table.

    Every getter records its problems under the dotted key path and returns a value of the right
    type (a placeholder after a problem), so one pass reports everything and the dataclasses
    still build. Each key a getter asks about is remembered, present or not: whatever is left
    in the table is an unknown key, and the asked-about keys are the spelling suggestions.
    """

    def __init__(self, table: Mapping[str, Any], where: str, problems: list[str], base_dir: Path):
        self.table = table
        self.where = where
        self.problems = problems
        self.base_dir = base_dir
        self.asked: set[str] = set()
        self.failed: set[str] = set()

    def path_of(self, key: str) -> str:
        if not key:
            return self.where
        return f"{self.where}.{key}" if self.where else key

    def report(self, key: str, message: str) -> None:
        self.failed.add(key)
        self.problems.append(f"{self.path_of(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.table

    def finish(self) -> None:
        for key in self.table:
            # Literal credentials were reported by the document-wide scan.
            if key in self.asked or key in _LITERAL_SECRET_KEYS:
                continue
            close = difflib.get_close_matches(key, sorted(self.asked), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            self.problems.append(f"unknown key '{self.path_of(key)}'{hint}")

    # raw access

    def _raw(self, key: str, required: bool) -> Any:
        self.asked.add(key)
        if key not in self.table:
            if required:
                self.report(key, "required key is missing")
            return _ABSENT
        value = self.table[key]
        if isinstance(value, str) and looks_like_token(value):
            # Reported by the literal scan; parsing it further could echo it in a message.
            self.failed.add(key)
            return _ABSENT
        return value

    def _typed(self, key: str, kind: type, required: bool) -> Any:
        value = self._raw(key, required)
        if value is _ABSENT:
            return _ABSENT
        if isinstance(value, bool) or not isinstance(value, kind):
            expected = _type_name(kind())  # the name of an empty value of that type
            self.report(key, f"expected {expected}, {_got(value)}")
            return _ABSENT
        return value

    # scalars

    def string(self, key: str, default: str | None = None) -> str:
        """A string; required (and non-empty) when there is no default."""
        value = self._typed(key, str, required=default is None)
        if value is _ABSENT:
            return default or ""
        if default is None and not value.strip():
            self.report(key, "must not be empty")
        return value

    def optional_string(self, key: str) -> str | None:
        if not self.has(key):
            self.asked.add(key)
            return None
        value = self._typed(key, str, required=False)
        return None if value is _ABSENT else value

    def choice(self, key: str, choices: tuple[str, ...], default: str | None) -> str:
        value = self.string(key, default)
        if key not in self.failed and value not in choices:
            self.report(key, f"{_shown(value)} is not supported; use {_or_list(choices)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._raw(key, required=False)
        if value is _ABSENT:
            return default
        if not isinstance(value, bool):
            self.report(key, f"expected true or false, {_got(value)}")
            return default
        return value

    def number(self, key: str, default: float, minimum: float, maximum: float) -> float:
        """A finite number within [minimum, maximum]; ``default`` after a problem."""
        value = self._raw(key, required=False)
        if value is _ABSENT:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.report(key, f"expected a number, {_got(value)}")
            return default
        # TOML has nan and inf; every comparison with nan is false, so a range check alone
        # would let it through (and a nan rate limit turns limiting off without a word).
        if not math.isfinite(value):
            self.report(key, f"{value} is not a finite number; use a number from {minimum:.15g} to {maximum:.15g}")
            return default
        if not minimum <= value <= maximum:
            self.report(key, f"{value:g} is out of range; use a number from {minimum:.15g} to {maximum:.15g}")
            return default
        return float(value)

    def integer(self, key: str, default: int, minimum: int, maximum: int) -> int:
        value = self._typed(key, int, required=False)
        if value is _ABSENT:
            return default
        if value < minimum:
            self.report(key, f"{value} is too small; the minimum is {minimum}")
            return default
        if value > maximum:
            self.report(key, f"{value} is too large; the maximum is {maximum}")
            return default
        return value

    def duration(
        self,
        key: str,
        default: str | None = None,
        *,
        positive: bool = False,
        maximum: float | None = None,
    ) -> float:
        """A duration in seconds; required when there is no default."""
        value = self._raw(key, required=default is None)
        if value is _ABSENT:
            return parse_duration(default) if default is not None else 0.0
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.report(key, f"expected a duration like 15m, got {_type_name(value)}")
            return 0.0
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.report(key, str(exc))
            return 0.0
        if seconds > MAX_DURATION:
            # Far-future times overflow date formatting (a 500 at the first token), and no
            # lifetime this long is meant. The value is shown as written: it may be 1e300.
            self.report(key, f"{_shown(value)} is more than {MAX_DURATION_TEXT}, the longest duration "
                             "the broker accepts")
        elif positive and seconds <= 0:
            self.report(key, "must be more than 0")
        elif maximum is not None and seconds > maximum:
            self.report(
                key, f"{format_duration(seconds)} is more than the maximum {format_duration(maximum)}"
            )
        return seconds

    def optional_duration(self, key: str, *, positive: bool = False) -> float | None:
        if not self.has(key):
            self.asked.add(key)
            return None
        return self.duration(key, positive=positive)

    def listen(self, key: str, default: str | None = None) -> tuple[str, int]:
        text = self.string(key, default)
        if key in self.failed:
            return "", 0
        try:
            return _parse_listen(text)
        except ValueError as exc:
            self.report(key, str(exc))
            return "", 0

    # lists

    def string_list(self, key: str, default: tuple[str, ...] | None) -> tuple[str, ...]:
        """A list of strings; required when there is no default. Bad items are left out."""
        value = self._typed(key, list, required=default is None)
        if value is _ABSENT:
            return default or ()
        items = []
        for index, item in enumerate(value):
            if isinstance(item, str) and looks_like_token(item):
                self.failed.add(key)  # reported by the literal scan
            elif isinstance(item, str):
                items.append(item)
            else:
                self.report(f"{key}[{index}]", f"expected a string, {_got(item)}")
                self.failed.add(key)
        return tuple(items)

    # paths

    def resolve(self, text: str) -> Path:
        return self.base_dir / Path(text).expanduser()

    def path(self, key: str, default: str) -> Path:
        """A path that need not exist yet, resolved against the config file's directory."""
        return self.resolve(self.string(key, default))

    def file(self, key: str, *, secret: bool = False, holds: str | None = None) -> Path:
        """A required, readable file; ``secret`` files must be private to their owner. A file
        that ``holds`` a credential (token, secret_id, role_id) must hold just that: one line."""
        text = self.string(key)
        if key in self.failed:
            return Path()
        return self._checked_file(key, text, secret, holds)

    def optional_file(self, key: str, *, secret: bool = False, holds: str | None = None) -> Path | None:
        """Like ``file``, but absent or "" means not configured."""
        if not self.has(key):
            self.asked.add(key)
            return None
        text = self.string(key, default="")
        if key in self.failed or not text:
            return None
        return self._checked_file(key, text, secret, holds)

    def _checked_file(self, key: str, text: str, secret: bool, holds: str | None) -> Path:
        path = self.resolve(text)
        problem = _file_problem(text, path, secret or holds is not None)
        if problem is None and secret:
            problem = check_secret_file_mode(path)
        if problem is None and holds is not None:
            try:
                content_problem = credential_problem(path.read_bytes(), holds)
            except OSError as exc:  # it was readable a moment ago
                content_problem = f"is not readable: {exc.strerror or exc}"
            if content_problem is not None:
                problem = f"{holds} file {text} {content_problem}"
        if problem is not None:
            self.report(key, problem)
        return path

    # nested tables

    def section(self, key: str, *, required: bool = False) -> _Reader:
        """A sub-table's reader; for a missing or mistyped one, a reader over nothing."""
        value = self._typed(key, dict, required=False)
        if value is not _ABSENT:
            return _Reader(value, self.path_of(key), self.problems, self.base_dir)
        if key in self.failed or required:
            if key not in self.failed:
                self.report(key, f"required section [{self.path_of(key)}] is missing")
            # Already reported: read defaults into a throwaway list so nothing is said twice.
            return _Reader({}, self.path_of(key), [], self.base_dir)
        return _Reader({}, self.path_of(key), self.problems, self.base_dir)

    def table_array(self, key: str) -> Iterator[_Reader]:
        """Readers for each table of a ``[[key]]`` array; at least one is required."""
        value = self._raw(key, required=False)
        path = self.path_of(key)
        if isinstance(value, dict):
            self.report(key, f"expected an array of tables; write [[{path}]] with two brackets")
            return
        if value is _ABSENT or value == []:
            self.report(key, f"at least one [[{path}]] entry is required")
            return
        if not isinstance(value, list):
            self.report(key, f"expected an array of tables, got {_type_name(value)}")
            return
        for index, item in enumerate(value):
            if isinstance(item, dict):
                yield _Reader(item, f"{path}[{index}]", self.problems, self.base_dir)
            else:
                self.report(f"{key}[{index}]", f"expected a table, got {_type_name(item)}")


# --- value checks -----------------------------------------------------------------------------

_LISTEN_HINT = "use host:port, like 127.0.0.1:8443, localhost:8443 or [::1]:8443"
_PORT = re.compile(r"[0-9]{1,5}")


def _parse_listen(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6addr]:port"`` → (host, port); the host comes back without brackets."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{_shown(text)} is not host:port; {_LISTEN_HINT}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_shown(host)} in {_shown(text)} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{_shown(text)} is not host:port; {_LISTEN_HINT}")
        if ":" in host:
            raise ValueError(
                f"{_shown(text)} is not host:port; put IPv6 addresses in brackets, like [::1]:8443"
            )
    if not _PORT.fullmatch(port) or int(port) > 65535:
        raise ValueError(f"{_shown(text)} has port {_shown(port)}; use a number from 0 to 65535")
    return host, int(port)


_IDENTITY_KINDS = ("cn", "uri", "dns")


def _pattern_problem(pattern: str) -> str | None:
    kind, sep, glob = pattern.partition(":")
    if not sep or kind not in _IDENTITY_KINDS:
        return f"{_shown(pattern)} matches no identity; patterns start with cn:, uri: or dns:"
    if not glob:
        return f"{_shown(pattern)} has nothing after '{kind}:'; add a name or glob, like {kind}:job-*"
    return None


def _patterns(r: _Reader, key: str, *, required: bool) -> tuple[str, ...]:
    patterns = r.string_list(key, None if required else ())
    if required and key not in r.failed and not patterns:
        r.report(key, "the list is empty, so nobody could fetch this; add at least one pattern")
    for index, pattern in enumerate(patterns):
        problem = _pattern_problem(pattern)
        if problem is not None:
            r.report(f"{key}[{index}]", problem)
    return patterns


# --- sections ---------------------------------------------------------------------------------


def _server(r: _Reader) -> ServerConfig:
    host, port = r.listen("listen")
    cert = r.file("cert")
    key = r.file("key", secret=True)
    client_ca = r.file("client_ca")
    client_crl = r.optional_file("client_crl")
    suites_given = r.has("tls13_ciphersuites")
    suites = r.string_list("tls13_ciphersuites", DEFAULT_CIPHERSUITES)
    if "tls13_ciphersuites" not in r.failed and not suites:
        r.report("tls13_ciphersuites", "must list at least one cipher suite")
    for index, suite in enumerate(suites):
        if suite not in TLS13_CIPHERSUITES:
            r.report(
                f"tls13_ciphersuites[{index}]",
                f"{_shown(suite)} is not a TLS 1.3 cipher suite; use {_or_list(TLS13_CIPHERSUITES)}",
            )
    max_body_bytes = r.integer("max_body_bytes", 64 * 1024, minimum=1, maximum=MAX_BODY_BYTES)
    handshake_timeout = r.duration("handshake_timeout", "10s", positive=True)
    revoke_on_shutdown = r.boolean("revoke_on_shutdown", False)
    tls_engine = r.choice("tls_engine", TLS_ENGINES, default="openssl")
    if tls_engine == "stdlib" and suites_given and suites != DEFAULT_CIPHERSUITES and not (
            r.failed & {"tls13_ciphersuites", "tls_engine"}):
        # Python's ssl cannot restrict TLS 1.3 suites: a list that differs from the default
        # would be accepted and silently not enforced.
        r.report(
            "tls13_ciphersuites",
            'tls_engine = "stdlib" cannot enforce a TLS 1.3 cipher suite list (Python\'s ssl has no way to '
            'restrict them); use tls_engine = "openssl", or remove tls13_ciphersuites',
        )
    rate_limit = r.number("rate_limit", 50.0, minimum=0.0, maximum=MAX_RATE_LIMIT)
    rate_limit_burst = r.number("rate_limit_burst", max(1.0, rate_limit * 2), minimum=1.0,
                                maximum=MAX_RATE_LIMIT_BURST)
    r.finish()
    return ServerConfig(
        host=host,
        port=port,
        cert=cert,
        key=key,
        client_ca=client_ca,
        client_crl=client_crl,
        tls13_ciphersuites=suites,
        max_body_bytes=max_body_bytes,
        handshake_timeout=handshake_timeout,
        revoke_on_shutdown=revoke_on_shutdown,
        tls_engine=tls_engine,
        rate_limit=rate_limit,
        rate_limit_burst=rate_limit_burst,
    )


def _ops(r: _Reader) -> OpsConfig:
    host, port = r.listen("listen", "127.0.0.1:9090")
    r.finish()
    return OpsConfig(host=host, port=port)


def _audit(r: _Reader) -> AuditConfig:
    path = r.path("path", "audit.jsonl")
    on_failure = r.choice("on_failure", AUDIT_ON_FAILURE, default="refuse")
    r.finish()
    return AuditConfig(path=path, on_failure=on_failure)


def _state(r: _Reader) -> StateConfig:
    directory = r.path("dir", "state")
    r.finish()
    return StateConfig(dir=directory)


def _vault_address(r: _Reader) -> str:
    address = r.string("address")
    if "address" in r.failed:
        return address
    problem = f"{_shown(url_without_secrets(address))} is not an http:// or https:// URL; use e.g. https://vault.example:8200"
    try:
        parts = urlsplit(address)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        r.report("address", problem)
        return address
    if parts.scheme not in ("http", "https") or not parts.hostname:
        r.report("address", problem)
    elif "@" in parts.netloc:
        # The part before "@" is user:password; say where it is, never what it says.
        r.report("address", "has a user name or password before '@' (not shown: it may be a secret); "
                            "give the broker's Vault credential in [[vault.auth]], and only scheme://host:port here")
    elif parts.query or parts.fragment or "?" in address or "#" in address:
        r.report("address", "has a query ('?…') or fragment ('#…') (not shown: it may hold a token); "
                            "use only scheme://host:port, with a path if Vault sits under one")
    return address.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: it may resolve anywhere


def _plaintext_problem(address: str) -> str | None:
    """http:// to anything but loopback sends the broker's token and every minted token in clear."""
    parts = urlsplit(address)
    if parts.scheme != "http" or not parts.hostname or _is_loopback(parts.hostname):
        return None
    return (
        f"http:// sends the broker's Vault token and every token it mints unencrypted to {parts.hostname}; "
        "use https://, or set allow_plaintext = true in [vault] if that network path is protected otherwise"
    )


def _vault(r: _Reader) -> VaultConfig:
    address = _vault_address(r)
    allow_plaintext = r.boolean("allow_plaintext", False)
    if "address" not in r.failed and not allow_plaintext:
        problem = _plaintext_problem(address)
        if problem is not None:
            r.report("address", problem)
    ca_cert = r.optional_file("ca_cert")  # "" means the system trust store
    timeout = r.duration("timeout", "5s", positive=True, maximum=MAX_VAULT_TIMEOUT)
    auth = tuple(_auth(entry) for entry in r.table_array("auth"))
    r.finish()
    return VaultConfig(address=address, auth=auth, ca_cert=ca_cert, timeout=timeout,
                       allow_plaintext=allow_plaintext)


_AUTH_KEYS = {
    "token": ("token_file", "token_env"),
    "approle": ("role_id_file", "secret_id_file", "mount", "rotate_secret_id"),
    "cert": ("cert_file", "key_file", "cert_role", "mount"),
}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _auth(r: _Reader) -> AuthConfig:
    method = r.choice("method", tuple(_AUTH_KEYS), default=None)
    if "method" in r.failed:
        # Without a method we cannot tell which keys belong; do not guess at unknown keys.
        r.asked.update(key for keys in _AUTH_KEYS.values() for key in keys)
        r.finish()
        return AuthConfig(method=method)
    _reject_other_methods_keys(r, method)
    if method == "token":
        config = _token_auth(r)
    elif method == "approle":
        config = AuthConfig(
            method=method,
            role_id_file=r.file("role_id_file", holds="role_id"),
            secret_id_file=r.file("secret_id_file", secret=True, holds="secret_id"),
            mount=_mount(r, "approle"),
            rotate_secret_id=r.optional_duration("rotate_secret_id", positive=True),
        )
    else:
        config = AuthConfig(
            method=method,
            cert_file=r.file("cert_file"),
            key_file=r.file("key_file", secret=True),
            cert_role=r.optional_string("cert_role"),
            mount=_mount(r, "cert"),
        )
    r.finish()
    return config


def _reject_other_methods_keys(r: _Reader, method: str) -> None:
    """A key of another method is a clearer problem than "unknown key"."""
    own = _AUTH_KEYS[method]
    for key in r.table:
        owners = tuple(m for m, keys in _AUTH_KEYS.items() if key in keys and key not in own)
        if owners:
            r.asked.add(key)
            r.report(key, f"method {method} does not use this key (it belongs to {_or_list(owners)})")


def _token_auth(r: _Reader) -> AuthConfig:
    token_file = r.optional_file("token_file", secret=True, holds="token")
    token_env = r.optional_string("token_env")
    if token_env is not None and not _ENV_NAME.fullmatch(token_env):
        r.report("token_env", f"{_shown(token_env)} is not an environment variable name")
    given_file = r.has("token_file") and r.table["token_file"] != ""
    given_env = r.has("token_env")
    if given_file and given_env:
        r.report("", "set only one of token_file or token_env, not both")
    elif not (given_file or given_env):
        r.report("", "method token needs token_file or token_env")
    return AuthConfig(method="token", token_file=token_file, token_env=token_env)


def _mount(r: _Reader, default: str) -> str:
    mount = r.string("mount", default).strip("/")
    if "mount" in r.failed:
        return default
    if not mount:
        r.report("mount", f"must not be empty; leave it out for the default '{default}'")
    elif mount.startswith("auth/"):
        r.report("mount", f"give the mount path without the auth/ prefix, like '{default}'")
    return mount


def _admin(r: _Reader) -> AdminConfig:
    allow = _patterns(r, "allow", required=False)
    r.finish()
    return AdminConfig(allow=allow)


PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_PROFILE_MODES = ("shared", "per-job")
_SHARED_ONLY = ("rotate_after", "check_interval", "alert_threshold")
_PER_JOB_ONLY = ("reuse_interval", "family_max_age", "max_families_per_client")
_BAD_ROLE_CHARS = re.compile(r"[/?#%\s]")


def _profiles(r: _Reader) -> dict[str, ProfileConfig]:
    profiles = {}
    for name in r.table:
        if not PROFILE_NAME.fullmatch(name):
            r.report(
                name,
                f"profile name {_shown(name)} is not allowed; use up to 63 lowercase letters, "
                "digits, '_', '.' or '-', starting with a letter or digit",
            )
        profiles[name] = _profile(name, r.section(name, required=True))
    if not r.table:
        # Also reached when [profiles] was not a table; that reader's problems list is a
        # throwaway one, so the type problem is not followed by this one.
        r.problems.append("profiles: at least one [profiles.<name>] section is required")
    return profiles


def _profile(name: str, r: _Reader) -> ProfileConfig:
    mode = r.choice("mode", _PROFILE_MODES, default="shared")
    token_role = r.string("token_role")
    if "token_role" not in r.failed and _BAD_ROLE_CHARS.search(token_role):
        r.report(
            "token_role",
            f"{_shown(token_role)} is not a token role name; it cannot contain '/', '?', '#', '%' or spaces",
        )
    policies = r.string_list("policies", ())
    ttl = r.duration("ttl", positive=True)
    grace = r.duration("grace", "15m")
    explicit_rotate_after = r.optional_duration("rotate_after", positive=True)
    allow = _patterns(r, "allow", required=True)
    check_interval = r.duration("check_interval", "60s", positive=True)
    alert_threshold = r.integer("alert_threshold", 2, minimum=1, maximum=MAX_ALERT_THRESHOLD)
    reuse_interval = r.duration("reuse_interval", "30s", maximum=60.0)
    family_max_age = r.duration("family_max_age", "24h", positive=True)
    max_families_per_client = r.integer("max_families_per_client", 100, minimum=1, maximum=MAX_FAMILIES_PER_CLIENT)
    if "mode" in r.failed:
        rotate_after = ttl  # which keys belong is unknown; the mode's problem is reported
    elif mode == "shared":
        for key in _PER_JOB_ONLY:
            if r.has(key):
                r.report(key, 'only per-job profiles use this; remove it or set mode = "per-job"')
        rotate_after = _rotate_after(r, ttl, grace, explicit_rotate_after)
    else:
        for key in _SHARED_ONLY:
            if r.has(key):
                r.report(key, "only shared profiles use this: a per-job family's token is replaced when its job "
                              "refreshes, not rotated or checked by the broker; remove it")
        if not r.failed & {"family_max_age", "reuse_interval"}:
            problem = _family_max_age_problem(family_max_age, reuse_interval)
            if problem is not None:
                r.report("family_max_age", problem)
        # Never used: nothing rotates a per-job profile. A replaced token lives min(grace, what
        # it has left), so no grace is too long for one.
        rotate_after = ttl
    r.finish()
    return ProfileConfig(
        name=name,
        token_role=token_role,
        ttl=ttl,
        grace=grace,
        rotate_after=rotate_after,
        allow=allow,
        policies=policies,
        mode=mode,
        check_interval=check_interval,
        alert_threshold=alert_threshold,
        reuse_interval=reuse_interval,
        family_max_age=family_max_age,
        max_families_per_client=max_families_per_client,
    )


def _family_max_age_problem(family_max_age: float, reuse_interval: float) -> str | None:
    """Why a family this short cannot work, or None. A family shorter than ttl is fine: each
    token is cut to end with its family. It must still leave room for one token, and outlive
    the window in which a job may retry a refresh."""
    if family_max_age < MIN_TOKEN_TTL:
        return (f"{format_duration(family_max_age)} leaves no room for a token: a family must last at least "
                f"{format_duration(MIN_TOKEN_TTL)}, the shortest token the broker mints")
    if family_max_age <= reuse_interval:
        return (f"{format_duration(family_max_age)} is not longer than reuse_interval "
                f"{format_duration(reuse_interval)}: the family would end while its job may still retry a "
                "refresh; raise family_max_age or lower reuse_interval")
    return None


def _rotate_after(r: _Reader, ttl: float, grace: float, explicit: float | None) -> float:
    """The effective rotate_after, reporting when grace cannot fit after a jittered rotation."""
    if r.failed & {"ttl", "grace", "rotate_after"}:
        return explicit or 0.0  # a duration is already wrong; the arithmetic would only confuse
    if explicit is None:
        rotate_after = default_rotate_after(ttl, grace)
        if rotate_after <= 0 and grace >= ttl:
            r.report(
                "grace",
                f"{format_duration(grace)} is not shorter than ttl {format_duration(ttl)}: the previous token "
                "would expire before its grace ends; lower grace or raise ttl",
            )
        elif rotate_after <= 0:
            margin = min(60.0, ttl / 10)
            r.report(
                "grace",
                f"{format_duration(grace)} does not fit in ttl {format_duration(ttl)}: "
                f"ttl minus grace leaves {format_duration(ttl - grace)}, and rotation needs "
                f"more than the {format_duration(margin)} safety margin; lower grace or raise ttl",
            )
        return rotate_after
    if explicit >= ttl:
        r.report(
            "rotate_after",
            f"{format_duration(explicit)} must be less than ttl {format_duration(ttl)}",
        )
        return explicit
    latest = explicit * (1 + ROTATION_JITTER)
    if latest + grace > ttl + 1e-6:  # tolerance: 50m * 1.1 is not exactly 55m in floats
        r.report(
            "grace",
            f"{format_duration(grace)} does not fit: rotation at up to {format_duration(latest)} "
            f"(rotate_after {format_duration(explicit)} + {ROTATION_JITTER:.0%} jitter) plus grace "
            f"{format_duration(grace)} exceeds ttl {format_duration(ttl)}; "
            "lower grace or rotate_after, or raise ttl",
        )
    return explicit


# --- loading ----------------------------------------------------------------------------------


def _read_toml(source: Path, problems: list[str], shown: Path) -> dict[str, Any] | None:
    """The document, or None with the problem in ``problems``, naming the file as ``shown``
    (the path as the user gave it, as every other line of ``broker check`` does)."""
    try:
        with source.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        problems.append(f"{shown}: config file does not exist")
    except IsADirectoryError:
        problems.append(f"{shown}: is a directory, not a config file")
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{shown}: invalid TOML: {exc}")
    except UnicodeDecodeError:
        problems.append(f"{shown}: invalid TOML: the file is not UTF-8 text")
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        problems.append(f"{shown}: invalid TOML: arrays or inline tables are nested too deeply")
    except OSError as exc:
        problems.append(f"{shown}: cannot read config file: {exc.strerror or exc}")
    return None


def _build(document: dict[str, Any], source: Path, problems: list[str]) -> Config:
    root = _Reader(document, "", problems, source.parent)
    server = _server(root.section("server", required=True))
    ops = _ops(root.section("ops"))
    audit = _audit(root.section("audit"))
    state = _state(root.section("state"))
    vault = _vault(root.section("vault", required=True))
    admin = _admin(root.section("admin"))
    profiles = _profiles(root.section("profiles"))
    root.finish()
    if server.port and (server.host, server.port) == (ops.host, ops.port):
        problems.append(f"ops.listen: {ops.host}:{ops.port} is server.listen too; give each listener its own port")
    return Config(
        server=server,
        ops=ops,
        audit=audit,
        state=state,
        vault=vault,
        admin=admin,
        profiles=profiles,
        source=source,
    )


def load_config(path: Path | str) -> Config:
    """Read and validate the TOML config at ``path``.

    Raises ``ConfigError`` listing every problem found, one sentence each, prefixed with the
    dotted key path (or the file path for problems with the file itself).
    """
    source = Path(os.path.abspath(path))  # abspath, not resolve: a symlinked config keeps its own dir
    problems: list[str] = []
    document = _read_toml(source, problems, Path(path))
    if document is None:
        raise ConfigError(problems)
    _scan_for_literal_secrets(document, problems)
    config = _build(document, source, problems)
    if problems:
        # The messages avoid echoing token-shaped values already; this catches any we missed.
        raise ConfigError([redact_tokens(p) for p in problems])
    return config


def check_config(path: Path | str) -> list[str]:
    """The problems ``load_config`` would raise, or an empty list when the config is valid."""
    try:
        load_config(path)
    except ConfigError as exc:
        return exc.problems
    return []
