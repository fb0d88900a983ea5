"""The job side: ``broker get`` and the admin calls, over mTLS with the standard library.

Configuration comes from the environment (BROKER_URL, BROKER_CERT, BROKER_KEY, BROKER_CA),
so a CI job needs no config file. 503, 429 and connection failures are retried with backoff
(honouring ``Retry-After``); anything else is answered at once. A request that is not safe to
repeat (starting a family, a refresh, an admin revoke) is retried only when it certainly never
reached the broker. Failures are ``ClientError`` with one sentence for the user and the exit
code to use; none carries a token.
"""

from __future__ import annotations

import errno
import http.client
import json
import math
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote, urlsplit

from broker.errors import BrokerError, CertError, url_without_secrets
from broker.tls import client_context

DEFAULT_URL = "https://localhost:8443"
MAX_RETRY_AFTER = 30.0
RETRIED_STATUSES = frozenset({429, 503})  # the broker did not act on the request: safe to repeat


class ClientError(BrokerError):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class FamilyGone(ClientError):
    """No live family of that id for this client certificate."""


@dataclass(frozen=True)
class ClientConfig:
    url: str
    cert: Path
    key: Path
    ca: Path
    retries: int = 5
    timeout: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str], retries: int = 5) -> ClientConfig:
        missing = [name for name in ("BROKER_CERT", "BROKER_KEY", "BROKER_CA") if not env.get(name)]
        if missing:
            raise ClientError(f"set {', '.join(missing)} to the job's certificate, key and the broker's CA file",
                              exit_code=2)
        paths = {name: Path(env[name]) for name in ("BROKER_CERT", "BROKER_KEY", "BROKER_CA")}
        for name, path in paths.items():
            if not path.exists():
                raise ClientError(f"{name} file {path} does not exist", exit_code=2)
            if not path.is_file():
                raise ClientError(f"{name} {path} is not a regular file (a directory or device?); give the PEM "
                                  "file's path", exit_code=2)
        url = env.get("BROKER_URL") or DEFAULT_URL
        return cls(url=_checked_url(url), cert=paths["BROKER_CERT"], key=paths["BROKER_KEY"],
                   ca=paths["BROKER_CA"], retries=retries)


def _parse_problem(exc: ValueError) -> str:
    """Why urlsplit refused the URL, without quoting it: its messages repeat the part they could
    not read ("Port could not be cast to integer value as 'pw'"), which may be a password."""
    text = str(exc)
    if text.startswith("Port"):
        return "the port is not a number from 0 to 65535"
    return text if "'" not in text and '"' not in text else "it cannot be parsed"


def _checked_url(url: str) -> str:
    """``url`` if it is ``https://host[:port][/]``; a usage error naming the problem otherwise."""
    def bad(problem: str) -> ClientError:
        return ClientError(f"BROKER_URL {url_without_secrets(url)!r} {problem}", exit_code=2)

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise bad(f"is not a valid URL ({_parse_problem(exc)})") from None
    if parts.scheme != "https" or not parts.hostname:
        raise bad("is not an https:// URL with a host, e.g. https://localhost:8443")
    if "@" in parts.netloc:
        raise bad("holds a user name or password; the client certificate is the only credential, remove them")
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.endswith(("?", "#")):
        raise bad("must be just https://host[:port]: the API paths are fixed (no path, query or fragment)")
    return url


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: Mapping[str, str]
    # An earlier try failed after the request may have reached the broker: a 404 to a release
    # then means that try ended the family.
    after_lost_answer: bool = False

    def json(self) -> dict[str, object]:
        """The body as a JSON object; ValueError if it is anything else."""
        data = json.loads(self.body)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data

    def error_message(self) -> str:
        try:
            data = self.json()
            return f"{data.get('error')}: {data.get('message')}"
        except (ValueError, TypeError):
            return f"HTTP {self.status}"


class BrokerClient:
    def __init__(self, config: ClientConfig, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None) -> None:
        self._config = config
        self._sleep = sleep
        self._rng = rng or random.Random()
        try:
            self._context = client_context(config.ca, config.cert, config.key)
        except CertError as exc:
            raise ClientError(str(exc), exit_code=2) from None
        parts = urlsplit(config.url)
        self._host = parts.hostname or "localhost"
        self._port = parts.port or 443

    def _once(self, method: str, path: str, accept: str, payload: bytes | None) -> Answer:
        conn = http.client.HTTPSConnection(self._host, self._port, context=self._context,
                                           timeout=self._config.timeout)
        headers = {"Accept": accept}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            try:
                conn.connect()
            except OSError as exc:
                raise _NotSent(exc) from exc
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            return Answer(response.status, response.read(), {k.lower(): v for k, v in response.getheaders()})
        finally:
            conn.close()

    def request(self, method: str, path: str, accept: str = "application/json",
                payload: dict[str, object] | None = None, unsafe: str | None = None) -> Answer:
        """One call, retried on 503 and 429 and on connection failures; other answers return at once.

        ``unsafe`` marks a call that must not happen twice (it says what a lost answer leaves
        behind): it is retried only when it certainly never reached the broker (connecting or the
        TLS handshake failed) or the broker refused it with 503/429. A refresh is one: the broker
        answers a repeated refresh token with the same pair only within ``reuse_interval`` and
        without a restart in between; otherwise a repeat is reuse and revokes the family."""
        data = json.dumps(payload).encode() if payload is not None else None
        attempts = max(0, self._config.retries) + 1
        url = url_without_secrets(self._config.url)
        lost_answer = False
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            try:
                answer = self._once(method, path, accept, data)
            except _NotSent as not_sent:
                exc = not_sent.cause
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise ClientError(self._unverified(exc)) from None
                if last or (isinstance(exc, ssl.SSLError) and _refused_certificate(exc)):
                    raise ClientError(_tls_failed(url, exc) if isinstance(exc, ssl.SSLError)
                                      else _unreachable(url, attempts, exc)) from None
                self._sleep(self._backoff(attempt, None))
                continue
            except (OSError, http.client.HTTPException) as exc:  # the request may have reached the broker
                if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
                    # A TLS alert after the handshake: the broker refused this client certificate.
                    if last or unsafe is not None or _refused_certificate(exc):
                        raise ClientError(_tls_failed(url, exc)) from None
                elif unsafe is not None:
                    raise ClientError(f"{_unreachable(url, attempt, exc)}; not retried: the broker may have "
                                      f"acted on the request, {unsafe}") from None
                elif last:
                    raise ClientError(_unreachable(url, attempts, exc)) from None
                else:
                    lost_answer = True
                self._sleep(self._backoff(attempt, None))
                continue
            if answer.status not in RETRIED_STATUSES or last:
                return replace(answer, after_lost_answer=lost_answer)
            self._sleep(self._backoff(attempt, answer.headers.get("retry-after")))
        raise AssertionError("unreachable")

    def _unverified(self, exc: ssl.SSLCertVerificationError) -> str:
        if exc.verify_code in (HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH):
            return (f"the broker's certificate is not issued for {self._host!r}, the host in BROKER_URL "
                    f"({exc.verify_message}); use a name the certificate is issued for in BROKER_URL, "
                    "e.g. localhost")
        return (f"cannot verify the broker's certificate with BROKER_CA ({exc.verify_message}); "
                "is BROKER_CA the CA that signed the broker's cert?")

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(MAX_RETRY_AFTER, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return self._rng.uniform(0, min(8.0, 0.5 * 2 ** (attempt - 1)))

    def get_token(self, profile: str, min_ttl: float | None = None) -> dict[str, object]:
        """A shared profile's token (a per-job profile is a usage error: see start_family)."""
        path = f"/v1/tokens/{quote(profile, safe='')}"
        if min_ttl:
            path += f"?min_ttl={math.ceil(min_ttl)}"  # rounding down would ask for less than wanted
        answer = self.request("GET", path)
        if answer.status == 400 and "per-job" in answer.error_message():
            if min_ttl:
                raise ClientError(f"--min-ttl does not apply to {profile}, a per-job profile: each token of a family "
                                  "lasts the profile's ttl; start the family with --refresh-file and run broker "
                                  "refresh before the token runs out", exit_code=2)
            # A family whose refresh token nobody keeps can be neither refreshed nor released: it
            # would hold one of the certificate's max_families_per_client places for a day.
            raise ClientError(f"{profile} is a per-job profile: keep its family's refresh token with --refresh-file "
                              "FILE, and run broker release --refresh-file FILE when the job ends", exit_code=2)
        return _with_token(self._ok(answer))

    def start_family(self, profile: str) -> dict[str, object]:
        lost = "so a family whose refresh token nobody holds may exist; it ends at the profile's family_max_age"
        return _with_token(self._ok(self.request("POST", f"/v1/tokens/{quote(profile, safe='')}", unsafe=lost)))

    def refresh(self, refresh_token: str) -> dict[str, object]:
        lost = ("so the refresh token may be spent; run broker refresh again soon: within the profile's "
                "reuse_interval the broker answers it with the same pair")
        return _with_token(self._ok(self.request("POST", "/v1/refresh", payload={"refresh_token": refresh_token},
                                                 unsafe=lost)))

    def release(self, family: str) -> dict[str, object] | None:
        """The DELETE's answer; None if a retry found the family gone (an earlier try whose
        answer was lost ended it). FamilyGone for a 404 otherwise: the family has ended, or
        was started with another certificate (which this one cannot tell apart)."""
        answer = self.request("DELETE", f"/v1/families/{quote(family, safe='')}")
        if answer.status == 404 and "token family" in answer.error_message():
            if answer.after_lost_answer:
                return None
            raise FamilyGone(f"broker answered 404 {answer.error_message()}")
        return self._ok(answer)

    def admin(self, profile: str, action: str) -> dict[str, object]:
        # A second revoke would revoke the token the first one minted, which jobs may already use.
        lost = ("so the profile's tokens may be revoked and a new one minted already; run broker revoke again "
                "if unsure (that also replaces the new token)") if action == "revoke" else None
        return self._ok(self.request("POST", f"/v1/tokens/{quote(profile, safe='')}/{action}", unsafe=lost))

    @staticmethod
    def _ok(answer: Answer) -> dict[str, object]:
        if answer.status != 200:
            raise ClientError(f"broker answered {answer.status} {answer.error_message()}")
        try:
            return answer.json()
        except ValueError:
            raise ClientError("the broker answered 200 but not with a JSON object; "
                              "is BROKER_URL the token broker?") from None


def _with_token(body: dict[str, object]) -> dict[str, object]:
    if not isinstance(body.get("token"), str) or not body["token"]:
        raise ClientError("the broker's answer carries no token; is BROKER_URL the token broker?")
    return body


# After a completed TLS 1.3 handshake the broker may still refuse the client certificate; the
# client then sees the connection closed (the alert is lost, see broker.tls), not a TLS error.
_CLOSED = (http.client.RemoteDisconnected, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH = 62, 64


class _NotSent(Exception):
    """Connecting or the TLS handshake failed: not a byte of the request left this process."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause)
        self.cause = cause


# TLS alerts by which the broker refuses the client certificate itself: trying again with the
# same certificate cannot help, so these are not retried.
_CERTIFICATE_ALERTS = ("UNSUPPORTED_CERTIFICATE", "UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_EXPIRED",
                       "CERTIFICATE_REVOKED", "CERTIFICATE_UNKNOWN", "CERTIFICATE_REQUIRED", "ACCESS_DENIED")


def _refused_certificate(exc: ssl.SSLError) -> bool:
    return any(alert in (exc.reason or "") for alert in _CERTIFICATE_ALERTS)


def _tls_failed(url: str, exc: ssl.SSLError) -> str:
    reason = exc.reason or ""
    if "UNSUPPORTED_CERTIFICATE" in reason:
        return (f"the broker at {url} refused this client certificate: it is not issued for client "
                "authentication (its extendedKeyUsage must include clientAuth, as `broker certs client` "
                "issues it); check BROKER_CERT")
    if "UNKNOWN_CA" in reason:
        return (f"the broker at {url} refused this client certificate: it does not trust the CA that signed it "
                f"({reason}); check BROKER_CERT, or ask the broker's operators which CA its client_ca is")
    if "CERTIFICATE_EXPIRED" in reason:
        # This certificate was checked to be within its dates before connecting: what the
        # broker finds expired is its own view of time, or its revocation list.
        return (f"the broker at {url} refused this client certificate as expired ({reason}), though it is valid "
                "now by this machine's clock: the broker's clock or its client_crl is out of date; tell the "
                "runner's operators (their /readyz says which)")
    if "CERTIFICATE_REVOKED" in reason:
        return (f"the broker at {url} refused this client certificate: it is revoked (the broker's client_crl "
                f"lists it; {reason}); ask for a new certificate and point BROKER_CERT and BROKER_KEY at it")
    if _refused_certificate(exc):
        return (f"the broker at {url} refused this client certificate ({reason}); check BROKER_CERT and "
                "BROKER_KEY, or ask for a new certificate")
    return (f"TLS handshake with {url} failed ({reason or exc}); the broker refused this client "
            "certificate (check BROKER_CERT and BROKER_KEY) or does not speak TLS 1.3")


def _unreachable(url: str, attempts: int, exc: BaseException) -> str:
    detail = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
    tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
    if isinstance(exc, _CLOSED):
        return (f"the broker at {url} closed the connection without answering ({detail}; {tries}); if it "
                "does so every time, it does not trust this client certificate: check BROKER_CERT and BROKER_KEY")
    return f"cannot reach the broker at {url} after {tries} ({detail})"


def write_secret_file(path: Path, text: str) -> None:
    """Atomically write ``text`` to ``path`` with mode 0600 (never briefly readable by others).
    The directory must exist: a typo in a path should fail, not create directories; and the
    path must be a regular file if it exists."""
    from broker.files import write_atomic

    if not path.parent.is_dir():
        raise FileNotFoundError(2, "No such directory", str(path.parent))
    if path.is_symlink():
        # The rename would replace the link itself (as root: /dev/stdout), not write through it.
        raise OSError(errno.ELOOP, "Is a symbolic link", str(path))
    if path.exists() and not path.is_file():
        # The write renames a new file over the path: as root, that would replace /dev/null.
        raise IsADirectoryError(21, "Not a regular file", str(path))
    write_atomic(path, text.encode(), mode=0o600)
