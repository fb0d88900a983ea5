"""Every input the mTLS API rejects: the exact status, a JSON error body, ``Cache-Control:
no-store``, and a broker that still serves tokens afterwards (DESIGN §3, §8).

One broker serves the whole module (starting one costs more than all these requests), with
the same leak scan at teardown as the ``brokers`` fixture. Tests here never rely on a
particular generation, only on what one request did, so their order does not matter.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.api import handlers
from tests.conftest import Pki, RunningBroker, assert_error, assert_still_serving, module_broker, raw

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROFILES: dict[str, dict[str, Any]] = {
    "demo": {},  # ttl 30s: min_ttl may be at most 29
    "ops-only": {"allow": ["cn:ops"]},
}


b = module_broker("api-errors", PROFILES)


# --- helpers (Raw, raw, assert_error, assert_still_serving live in conftest.py) -------------

def audit_after(b: RunningBroker, mark: int) -> list[dict[str, Any]]:
    return b.audit_events()[mark:]


FORBIDDEN_NEEDLE = "may not fetch"


# --- forbidden and unknown profiles look the same ------------------------------------------

async def test_forbidden_profile_is_403_and_audited(b: RunningBroker) -> None:
    mark = len(b.audit_events())
    answer = await raw(b, "GET", "/v1/tokens/demo", cert="stranger")
    assert_error(answer, 403, "forbidden", FORBIDDEN_NEEDLE)
    denied = [e for e in audit_after(b, mark) if e["event"] == "token_denied"]
    assert [(e["profile"], e["identity"], e["outcome"]) for e in denied] == [("demo", "cn:stranger", "denied")]
    assert not [e for e in audit_after(b, mark) if e["event"] == "token_served"]
    await assert_still_serving(b)


async def test_unknown_profile_is_403_byte_identical_to_forbidden(b: RunningBroker) -> None:
    mark = len(b.audit_events())
    forbidden = await raw(b, "GET", "/v1/tokens/demo", cert="stranger")
    unknown = await raw(b, "GET", "/v1/tokens/no-such-profile", cert="job")
    assert_error(unknown, 403, "forbidden", FORBIDDEN_NEEDLE)
    assert unknown.text == forbidden.text, "an unknown profile must not be told apart from a forbidden one"
    assert unknown.headers.get("Content-Type") == forbidden.headers.get("Content-Type")
    denied = [e for e in audit_after(b, mark) if e["event"] == "token_denied"]
    assert [e["identity"] for e in denied] == ["cn:stranger", "cn:job"]
    assert denied[1]["reason"] == "unknown profile" and denied[0]["reason"] != "unknown profile"
    await assert_still_serving(b)


async def test_profile_allowed_to_someone_else_is_403(b: RunningBroker) -> None:
    answer = await raw(b, "GET", "/v1/tokens/ops-only", cert="job")
    assert_error(answer, 403, "forbidden", FORBIDDEN_NEEDLE)
    await assert_still_serving(b)


# --- routing: unknown path, wrong method, oversized body -----------------------------------

@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/nope"), ("GET", "/"), ("GET", "/v1/tokens/demo/extra/segments"),
                                              ("GET", "/v2/tokens/demo"), ("DELETE", "/v1/families/x/"),
                                              ("DELETE", "/v1/familie")])
async def test_unknown_route_is_404_json_naming_every_route(b: RunningBroker, method: str, path: str) -> None:
    answer = await raw(b, method, path)
    assert_error(answer, 404, "not_found", "GET /v1/tokens/{profile}, GET /v1/tokens, GET /v1/whoami",
                 "POST /v1/tokens/{profile}, POST /v1/tokens/{profile}/rotate, POST /v1/tokens/{profile}/revoke",
                 "POST /v1/refresh, GET /v1/families, DELETE /v1/families/{family}")
    await assert_still_serving(b)


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("DELETE", "/v1/tokens/demo", "GET"),
    ("PUT", "/v1/whoami", "GET"),
    ("POST", "/v1/whoami", "GET"),
    ("GET", "/v1/tokens/demo/rotate", "POST"),
    ("DELETE", "/v1/families", "GET"),  # an id is needed to end one
])
async def test_wrong_method_is_405_json(b: RunningBroker, method: str, path: str, allowed: str) -> None:
    answer = await raw(b, method, path)
    assert_error(answer, 405, "method_not_allowed", method, allowed)
    assert allowed in answer.headers.get("Allow", "")
    await assert_still_serving(b)


async def test_head_on_a_token_is_405_and_serves_nothing(b: RunningBroker) -> None:
    mark = len(b.audit_events())
    answer = await raw(b, "HEAD", "/v1/tokens/demo?min_ttl=29")
    assert answer.status == 405 and answer.text == ""  # a HEAD answer has no body to carry JSON
    assert answer.headers.get("Cache-Control") == "no-store" and answer.headers.get("Allow") == "GET,POST"
    assert not [e for e in audit_after(b, mark) if e["event"] in ("token_served", "token_minted")]
    await assert_still_serving(b)


async def test_body_over_the_limit_is_413_json_and_nothing_rotates(b: RunningBroker) -> None:
    before = b.generation()
    answer = await raw(b, "POST", "/v1/tokens/demo/rotate", cert="ops", data=b"x" * (1024 * 1024))
    assert_error(answer, 413, "payload_too_large", str(64 * 1024))
    assert b.generation() == before
    await assert_still_serving(b)


async def test_a_chunked_body_over_the_limit_is_413_before_the_handler_acts(b: RunningBroker) -> None:
    """No Content-Length to refuse it by: the body is read, bounded, before any route acts
    (admin rotate and a family start take no body, and used to act and leave it unread)."""
    async def chunks() -> Any:
        for _ in range(80):
            yield b"x" * 1000

    before = b.generation()
    answer = await raw(b, "POST", "/v1/tokens/demo/rotate", cert="ops", data=chunks())
    assert_error(answer, 413, "payload_too_large", f"over the limit of {64 * 1024} bytes")
    assert answer.headers.get("Connection") == "close"
    assert b.generation() == before
    await assert_still_serving(b)


async def test_internal_error_is_500_json_without_details(b: RunningBroker, monkeypatch: pytest.MonkeyPatch,
                                                          log_lines: list[str]) -> None:
    def boom(_: float) -> str:
        raise RuntimeError("a message that may quote a value")

    monkeypatch.setattr(handlers, "rfc3339", boom)
    seen = len(log_lines)
    answer = await raw(b, "GET", "/v1/tokens")
    assert_error(answer, 500, "internal", "logged")
    assert "may quote" not in answer.text and "RuntimeError" not in answer.text
    # The log says what and where (type, code locations), never the message: a third-party
    # message may quote a header or a body.
    logged = [line for line in log_lines[seen:] if "internal_error route=" in line]
    assert len(logged) == 1 and "RuntimeError at test_api_errors.py:" in logged[0], log_lines[seen:]
    assert "may quote" not in "".join(log_lines[seen:])
    monkeypatch.undo()
    await assert_still_serving(b)


# --- query parameters -------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, cert, needles", [
    ("GET", "/v1/tokens/demo?minttl=600", "job",
     ["unknown query parameter 'minttl'", "GET /v1/tokens/{profile} takes only min_ttl"]),
    ("GET", "/v1/tokens/demo?min_ttl=5&format=raw", "job", ["unknown query parameter 'format'"]),
    ("GET", "/v1/tokens?profile=demo", "job", ["unknown query parameter 'profile'", "takes no query parameters"]),
    ("GET", "/v1/whoami?" + "x" * 100 + "=1", "job", ["unknown query parameter '" + "x" * 40 + "'…"]),
    ("POST", "/v1/tokens/demo/rotate?force=1", "ops", ["unknown query parameter 'force'", "takes no query"]),
])
async def test_an_unknown_query_parameter_is_400_and_nothing_is_served(
        b: RunningBroker, method: str, path: str, cert: str, needles: list[str]) -> None:
    mark, before = len(b.audit_events()), b.generation()
    answer = await raw(b, method, path, cert=cert)
    assert_error(answer, 400, "bad_request", *needles)
    assert not [e for e in audit_after(b, mark) if e["event"] in ("token_served", "admin_rotate")]
    assert b.generation() == before
    await assert_still_serving(b)


@pytest.mark.parametrize("query", ["hvs.CAESIJx9aZ3vQ0hY5xkP2mWnT8rLbD=1", "min_ttl=s.CAESIJx9aZ3vQ0hY5xkP"])
async def test_a_token_shaped_query_is_refused_without_repeating_any_of_it(b: RunningBroker, query: str) -> None:
    answer = await raw(b, "GET", f"/v1/tokens/demo?{query}")
    body = assert_error(answer, 400, "bad_request", "(a value shaped like a Vault token, not repeated)")
    assert "CAESI" not in answer.text and "hvs." not in body["message"] and "s.CA" not in answer.text
    await assert_still_serving(b)


# --- min_ttl --------------------------------------------------------------------------------

# Whole seconds in ASCII digits only: int() and float() would take most of these.
@pytest.mark.parametrize("value", ["abc", "", "0x10", "10s", "-5", "-0.5", "nan", "NaN", "inf", "-inf",
                                   "Infinity", "1e400", "1.5", "29.5", "1e9", "1_0", "%2010", "10%20", "%D9%A1",
                                   "-0", "%2B5", "1234567890"])
async def test_min_ttl_that_is_not_a_whole_number_of_seconds_is_400(b: RunningBroker, value: str) -> None:
    answer = await raw(b, "GET", f"/v1/tokens/demo?min_ttl={value}")
    assert_error(answer, 400, "bad_request", "min_ttl must be a whole number of seconds (at most 9 digits 0-9)")
    await assert_still_serving(b)


@pytest.mark.parametrize("value", ["1e308", "9" * 400, "x" * 400])
async def test_min_ttl_error_never_echoes_a_huge_value(b: RunningBroker, value: str) -> None:
    answer = await raw(b, "GET", f"/v1/tokens/demo?min_ttl={value}")
    body = assert_error(answer, 400, "bad_request", "min_ttl must be a whole number of seconds")
    assert len(body["message"]) < 120, body
    await assert_still_serving(b)


@pytest.mark.parametrize("query", ["min_ttl=5&min_ttl=5000", "min_ttl=5&min_ttl=5", "min_ttl=5&min_ttl="])
async def test_repeated_min_ttl_is_400(b: RunningBroker, query: str) -> None:
    answer = await raw(b, "GET", f"/v1/tokens/demo?{query}")
    assert_error(answer, 400, "bad_request", "min_ttl is given 2 times; give it once")
    await assert_still_serving(b)


@pytest.mark.parametrize("value", ["30", "3600", "999999999", "000000030"])
async def test_min_ttl_beyond_what_the_profile_can_give_is_400(b: RunningBroker, value: str) -> None:
    before = b.generation()
    answer = await raw(b, "GET", f"/v1/tokens/demo?min_ttl={value}")
    assert_error(answer, 400, "bad_request", "min_ttl", "demo", "at most 29s")
    assert b.generation() == before, "an impossible min_ttl must not trigger a rotation"
    await assert_still_serving(b)


async def test_min_ttl_within_the_profile_is_served(b: RunningBroker) -> None:
    status, body, _ = await b.request("GET", "/v1/tokens/demo?min_ttl=5")
    assert status == 200 and body["ttl"] >= 5


@pytest.mark.parametrize(("cert", "profile"), [("stranger", "demo"), ("job", "no-such-profile")])
@pytest.mark.parametrize("value", ["abc", "-1", "nan", "100000"])
async def test_min_ttl_error_on_a_forbidden_profile_is_still_403(b: RunningBroker, cert: str, profile: str,
                                                                value: str) -> None:
    forbidden = await raw(b, "GET", "/v1/tokens/demo", cert="stranger")
    answer = await raw(b, "GET", f"/v1/tokens/{profile}?min_ttl={value}", cert=cert)
    assert_error(answer, 403, "forbidden", FORBIDDEN_NEEDLE)
    assert answer.text == forbidden.text, "min_ttl validation must not reveal whether the profile exists"
    await assert_still_serving(b)


# --- admin actions --------------------------------------------------------------------------

@pytest.mark.parametrize("action", ["rotate", "revoke"])
async def test_non_admin_admin_action_is_403(b: RunningBroker, action: str) -> None:
    before = b.generation()
    mark = len(b.audit_events())
    answer = await raw(b, "POST", f"/v1/tokens/demo/{action}", cert="job")
    assert_error(answer, 403, "forbidden", "admin")
    assert b.generation() == before
    denied = [e for e in audit_after(b, mark) if e["event"] == "token_denied"]
    assert [(e["profile"], e["identity"]) for e in denied] == [("demo", "cn:job")]
    assert not [e for e in audit_after(b, mark) if e["event"].startswith("admin_")]
    await assert_still_serving(b)


@pytest.mark.parametrize("action", ["rotate", "revoke"])
async def test_non_admin_admin_action_on_unknown_profile_is_the_same_403(b: RunningBroker, action: str) -> None:
    known = await raw(b, "POST", f"/v1/tokens/demo/{action}", cert="job")
    unknown = await raw(b, "POST", f"/v1/tokens/nope/{action}", cert="job")
    assert_error(unknown, 403, "forbidden", "admin")
    assert unknown.text == known.text
    await assert_still_serving(b)


@pytest.mark.parametrize("action", ["rotate", "revoke"])
async def test_admin_action_on_unknown_profile_is_404_json(b: RunningBroker, action: str) -> None:
    answer = await raw(b, "POST", f"/v1/tokens/nope/{action}", cert="ops")
    assert_error(answer, 404, "not_found", "nope", "demo")
    await assert_still_serving(b)


# --- hostile names and paths ------------------------------------------------------------------

async def test_very_long_profile_name_is_403_json_never_500(b: RunningBroker) -> None:
    answer = await raw(b, "GET", "/v1/tokens/" + "a" * 10_000)
    assert_error(answer, 403, "forbidden", FORBIDDEN_NEEDLE)
    await assert_still_serving(b)


async def test_very_long_profile_name_in_admin_call_is_404_json_and_not_echoed(b: RunningBroker) -> None:
    answer = await raw(b, "POST", "/v1/tokens/" + "a" * 10_000 + "/rotate", cert="ops")
    body = assert_error(answer, 404, "not_found")
    assert len(body["message"]) < 300, "the message must not echo a 10 000-character name"
    await assert_still_serving(b)


# Each decodes to a profile name with a "/", "..", or NUL in it: no such profile, so the same
# 403 as a forbidden one (never a path walk to another route, never a 404 that tells it apart).
@pytest.mark.parametrize(("path", "status", "code", "needle"), [
    ("/v1/tokens/..%2F..%2Fetc", 403, "forbidden", FORBIDDEN_NEEDLE),
    ("/v1/tokens/%2e%2e", 403, "forbidden", FORBIDDEN_NEEDLE),
    ("/v1/tokens/%2E%2E%2Fwhoami", 403, "forbidden", FORBIDDEN_NEEDLE),
    ("/v1/tokens/demo%2Frotate", 403, "forbidden", FORBIDDEN_NEEDLE),
    ("/v1/tokens/..%2Fdemo", 403, "forbidden", FORBIDDEN_NEEDLE),
    ("/v1/tokens/%00", 403, "forbidden", FORBIDDEN_NEEDLE),
    ("/v1/tokens/demo%00", 403, "forbidden", FORBIDDEN_NEEDLE),
])
async def test_encoded_path_tricks_get_the_exact_json_error(b: RunningBroker, path: str, status: int, code: str,
                                                            needle: str) -> None:
    before = b.generation()
    forbidden = await raw(b, "GET", "/v1/tokens/demo", cert="stranger")
    answer = await raw(b, "GET", path)
    assert_error(answer, status, code, needle)
    assert answer.text == forbidden.text, "indistinguishable from a forbidden profile"
    assert b.generation() == before
    await assert_still_serving(b)


# --- client certificates --------------------------------------------------------------------

async def test_cert_without_client_auth_eku_is_refused_at_the_handshake(b: RunningBroker) -> None:
    """The openssl engine refuses a cert with no extendedKeyUsage in the handshake itself; the
    stdlib engine (which cannot) answers 403 instead: tests/test_tls_engines.py covers that."""
    mark = len(b.audit_events())
    before = b.metric("broker_tls_handshakes_total", outcome="failure") or 0
    for _ in range(2):  # the second time the listener remembers the certificate: still refused
        await _refused(b, _tls_client(b.pki, name="no-eku"))
    assert not [e for e in audit_after(b, mark) if e["identity"] == "cn:no-eku"]
    assert b.metric("broker_tls_handshakes_total", outcome="failure") == before + 2, "each refusal counted"


# TLS refusals. The listener is TLS 1.3 only and verifies the client after the server's
# Finished, so the client may see the refusal as an SSL alert, a reset, or EOF on its first
# read; what it must never see is an HTTP answer.

REQUEST = b"GET /v1/tokens/demo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def _tls_client(pki: Pki, *, pem_dir: Path | None = None, name: str | None = None,
                tls12_only: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=pki.ca)
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if name is not None:
        directory = pem_dir or pki.dir
        ctx.load_cert_chain(directory / f"{name}.pem", directory / f"{name}.key")
    return ctx


@dataclass(frozen=True)
class Outcome:
    stage: str  # "handshake" if the TLS handshake itself failed, else "exchange"
    data: bytes = b""
    error: BaseException | None = None


async def _exchange(port: int, ctx: ssl.SSLContext) -> Outcome:
    """Handshake, send one request, read to EOF: what came back, or where and how it failed."""
    try:
        reader, writer = await asyncio.open_connection("localhost", port, ssl=ctx, server_hostname="localhost")
    except (ssl.SSLError, ConnectionError) as exc:
        return Outcome("handshake", error=exc)
    try:
        writer.write(REQUEST)
        await writer.drain()
        return Outcome("exchange", data=await reader.read())
    except (ssl.SSLError, ConnectionError) as exc:
        return Outcome("exchange", error=exc)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ssl.SSLError, ConnectionError):
            pass


async def _refused(b: RunningBroker, ctx: ssl.SSLContext) -> Outcome:
    outcome = await asyncio.wait_for(_exchange(b.broker.api_port, ctx), timeout=10)
    assert outcome.data == b"", f"the broker answered a refused client: {outcome.data[:80]!r}"
    await assert_still_serving(b)
    return outcome


async def test_handshake_without_client_cert_is_refused(b: RunningBroker) -> None:
    await _refused(b, _tls_client(b.pki))


async def test_handshake_with_cert_from_another_ca_is_refused(b: RunningBroker) -> None:
    await _refused(b, _tls_client(b.pki, pem_dir=b.pki.other_dir, name="job"))


async def test_handshake_with_server_auth_only_cert_is_refused(b: RunningBroker) -> None:
    await _refused(b, _tls_client(b.pki, name="server-only"))


async def test_tls12_only_client_is_refused_during_the_handshake(b: RunningBroker) -> None:
    outcome = await _refused(b, _tls_client(b.pki, name="job", tls12_only=True))
    assert outcome.stage == "handshake", outcome


async def test_valid_client_through_the_same_raw_path_gets_200(b: RunningBroker) -> None:
    """The refusal tests above are meaningful: the same exchange with a good cert succeeds."""
    outcome = await asyncio.wait_for(_exchange(b.broker.api_port, _tls_client(b.pki, name="job")), timeout=10)
    assert outcome.error is None and outcome.data.startswith(b"HTTP/1.1 200"), outcome
    head, _, body = outcome.data.partition(b"\r\n\r\n")
    b.seen_secrets.add(json.loads(body)["token"])
