"""The job side: ``broker get`` and the admin calls, over mTLS with the standard library.

Configuration comes from the environment (BROKER_URL, BROKER_CERT, BROKER_KEY, BROKER_CA),
so a CI job needs no config file. 503 and connection failures are retried with backoff
(honouring ``Retry-After``); anything else is answered at once. Failures are ``ClientError``
with one sentence for the user and the exit code to use; none carries a token.
"""

from __future__ import annotations

import http.client
import json
import math
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from broker.errors import BrokerError, CertError
from broker.tls import client_context

DEFAULT_URL = "https://localhost:8443"
MAX_RETRY_AFTER = 30.0


class ClientError(BrokerError):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
            if not path.is_file():
                raise ClientError(f"{name} file {path} does not exist", exit_code=2)
        url = env.get("BROKER_URL") or DEFAULT_URL
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
        except ValueError:
            raise ClientError(f"BROKER_URL {url!r} has an invalid port", exit_code=2) from None
        if parts.scheme != "https" or not parts.hostname:
            raise ClientError(f"BROKER_URL must be an https:// URL, got {url!r}", exit_code=2)
        return cls(url=url, cert=paths["BROKER_CERT"], key=paths["BROKER_KEY"], ca=paths["BROKER_CA"],
                   retries=retries)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: Mapping[str, str]

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
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            return Answer(response.status, response.read(), {k.lower(): v for k, v in response.getheaders()})
        finally:
            conn.close()

    def request(self, method: str, path: str, accept: str = "application/json",
                payload: dict[str, object] | None = None) -> Answer:
        """One call, retried on 503 and on connection failures; other answers return at once.

        Retrying a refresh is safe: the broker answers the retried previous refresh token with
        the pair it already issued (within the profile's reuse_interval)."""
        data = json.dumps(payload).encode() if payload is not None else None
        attempts = max(0, self._config.retries) + 1
        for attempt in range(1, attempts + 1):
            try:
                answer = self._once(method, path, accept, data)
            except ssl.SSLCertVerificationError as exc:
                raise ClientError(f"cannot verify the broker's certificate with BROKER_CA ({exc.verify_message}); "
                                  "is BROKER_CA the CA that signed the broker's cert?") from None
            except ssl.SSLError as exc:
                problem = (f"TLS handshake with {self._config.url} failed ({exc.reason or exc}); the broker "
                           "refused this client certificate (check BROKER_CERT and BROKER_KEY) or does not speak "
                           "TLS 1.3")
                if attempt == attempts:
                    raise ClientError(problem) from None
                self._sleep(self._backoff(attempt, None))
                continue
            except (OSError, http.client.HTTPException) as exc:
                if attempt == attempts:
                    raise ClientError(_unreachable(self._config.url, attempts, exc)) from None
                self._sleep(self._backoff(attempt, None))
                continue
            if answer.status != 503 or attempt == attempts:
                return answer
            self._sleep(self._backoff(attempt, answer.headers.get("retry-after")))
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(MAX_RETRY_AFTER, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return self._rng.uniform(0, min(8.0, 0.5 * 2 ** (attempt - 1)))

    def get_token(self, profile: str, min_ttl: float | None = None) -> dict[str, object]:
        """A shared profile's token; for a per-job profile, the first token of a new family."""
        path = f"/v1/tokens/{quote(profile, safe='')}"
        if min_ttl:
            path += f"?min_ttl={math.ceil(min_ttl)}"  # rounding down would ask for less than wanted
        answer = self.request("GET", path)
        if answer.status == 400 and "per-job" in answer.error_message():
            return self.start_family(profile)
        return _with_token(self._ok(answer))

    def start_family(self, profile: str) -> dict[str, object]:
        return _with_token(self._ok(self.request("POST", f"/v1/tokens/{quote(profile, safe='')}")))

    def refresh(self, refresh_token: str) -> dict[str, object]:
        return _with_token(self._ok(self.request("POST", "/v1/refresh", payload={"refresh_token": refresh_token})))

    def release(self, family: str) -> dict[str, object]:
        return self._ok(self.request("DELETE", f"/v1/families/{quote(family, safe='')}"))

    def admin(self, profile: str, action: str) -> dict[str, object]:
        return self._ok(self.request("POST", f"/v1/tokens/{quote(profile, safe='')}/{action}"))

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


def _unreachable(url: str, attempts: int, exc: BaseException) -> str:
    detail = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
    tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
    if isinstance(exc, _CLOSED):
        return (f"the broker at {url} closed the connection without answering ({detail}; {tries}); if it "
                "does so every time, it does not trust this client certificate: check BROKER_CERT and BROKER_KEY")
    return f"cannot reach the broker at {url} after {tries} ({detail})"


def write_secret_file(path: Path, text: str) -> None:
    """Atomically write ``text`` to ``path`` with mode 0600 (never briefly readable by others).
    The directory must exist: a typo in a path should fail, not create directories."""
    from broker.files import write_atomic

    if not path.parent.is_dir():
        raise FileNotFoundError(2, "No such directory", str(path.parent))
    write_atomic(path, text.encode(), mode=0o600)
