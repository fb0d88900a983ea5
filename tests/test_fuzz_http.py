"""Hypothesis throws random methods, paths, queries, headers and bodies at a real broker over
mTLS; every answer must be a 2xx or a 4xx with the JSON error shape, never a 5xx."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.devserver import OpenBaoDevServer
from tests.conftest import Pki
from tests.processes import ServeProcess, listening_ports, serve_config, serve_env


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, pki: Pki, openbao: OpenBaoDevServer) -> Iterator[ServeProcess]:
    serve = serve_config(tmp_path_factory.mktemp("fuzz"), pki, openbao, "fuzz",
                         {"ttl": "1h", "grace": "5m", "rotate_after": "40m"},
                         server_extra="rate_limit = 0\nmax_body_bytes = 4096")
    with serve.stderr_path.open("ab") as stderr:  # scanned for tokens at the end
        proc = subprocess.Popen([sys.executable, "-m", "broker", "serve", "--config", str(serve.config)],
                                env=serve_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    metrics = ""
    try:
        deadline = time.monotonic() + 20
        while (ports := listening_ports(serve.stderr_path.read_bytes())) is None:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"broker serve did not say where it listens: {serve.stderr_path.read_text()}")
            time.sleep(0.05)
        serve.api_port, serve.ops_port = ports
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{serve.ops_port}/readyz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("broker serve did not become ready") from None
                time.sleep(0.1)
        status, _, data = _fetch(serve, "GET", "/v1/tokens/demo", {}, b"", "job")
        assert status == 200, data  # the current token: the leak scan below looks for it
        yield serve
        with urllib.request.urlopen(f"http://127.0.0.1:{serve.ops_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    assert serve.seen_secrets
    serve.assert_no_leaks(metrics)


def _fetch(serving: ServeProcess, method: str, target: str, headers: dict[str, str], body: bytes,
           cert: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request; the answer goes to the leak scan (a token to look for, or an error body)."""
    conn = http.client.HTTPSConnection("localhost", serving.api_port, context=serving.pki.client_context(cert),
                                       timeout=10)
    try:
        conn.request(method, target, body=body or None, headers=headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    serving.record_answer(response.status, data.decode("utf-8", "replace"))
    return response.status, response.headers, data


_segment = st.one_of(
    st.sampled_from(["v1", "tokens", "demo", "whoami", "rotate", "revoke", "..", ".", "%2e%2e", "%2F", "families",
                     "refresh", "", "%00", "%ff", "~"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x2FF), max_size=12).map(lambda t: quote(t, safe="")),
)
_path = st.lists(_segment, min_size=0, max_size=5).map(lambda parts: "/" + "/".join(parts))
_query = st.dictionaries(st.sampled_from(["min_ttl", "x", "profile", ""]),
                         st.one_of(st.sampled_from(["-1", "nan", "1e309", "0", "59", "abc", ""]),
                                   st.integers(-10**6, 10**6).map(str)), max_size=3)
_header_name = st.from_regex(r"X-[A-Za-z0-9-]{1,20}", fullmatch=True)
_header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
_headers = st.dictionaries(st.one_of(_header_name, st.sampled_from(["Accept", "Content-Type"])),
                           _header_value, max_size=4)
_body = st.one_of(st.just(b""), st.binary(max_size=2000), st.just(b"{" * 500), st.just(b"x" * 6000),
                  st.just(b'{"refresh_token": 1}'))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]), path=_path,
       query=_query, headers=_headers, body=_body, cert=st.sampled_from(["job", "ops", "stranger"]))
def test_random_requests_get_2xx_or_json_4xx(serving: ServeProcess, method: str, path: str, query: dict[str, str],
                                             headers: dict[str, str], body: bytes, cert: str) -> None:
    target = path + ("?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in query.items()) if query else "")
    status, answer_headers, data = _fetch(serving, method, target, headers, body, cert)
    assert status < 500, (status, data[:200])
    assert answer_headers.get("Cache-Control") == "no-store"
    if status >= 400 and method != "HEAD":
        error = json.loads(data)
        assert set(error) == {"error", "message"} and error["message"], error
