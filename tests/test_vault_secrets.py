"""No credential in the text of a Vault error: what requests, hvac and OpenBao say about a
failed call is classified once (broker/vault/client.py), and that text goes to logs, audit,
/readyz and 503 answers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import hvac.exceptions as hx
import pytest
import requests
from prometheus_client import CollectorRegistry

from broker.devserver import OpenBaoDevServer
from broker.errors import VaultRequestRejected, VaultUnavailable
from broker.metrics import Metrics
from broker.vault.client import MalformedAnswer, VaultClient, VaultClientConfig, _login, classify

TOKEN = "hvs.CAESIJx9aZ3vQ0hY5xkP2mWnT8rLbDq7Yw"  # token-shaped, never a real one
OLD_TOKEN = "hvs.OLDoldOLDoldOLDoldOLDoldOLDold1234"


@pytest.fixture
def vault(openbao: OpenBaoDevServer) -> Iterator[VaultClient]:
    client = VaultClient(VaultClientConfig(address=openbao.address), Metrics(CollectorRegistry()))
    client.use_token("root")
    yield client
    client.close()


async def test_a_token_with_a_line_break_never_reaches_the_error_text(vault: VaultClient) -> None:
    # requests refuses the X-Vault-Token header and quotes its value whole in the exception.
    with pytest.raises(VaultUnavailable) as caught:
        await vault.lookup_self_with(f"{TOKEN}\nold: {OLD_TOKEN}")
    text = str(caught.value)
    assert text == ("vault login_token: unexpected InvalidHeader (its text is not shown: it may contain "
                    "a credential)")
    assert "CAESIJ" not in text and "OLDold" not in text


async def test_vault_error_text_that_echoes_a_credential_is_redacted(vault: VaultClient) -> None:
    # OpenBao repeats request values in some errors ("unknown role <name>", and in the URL).
    with pytest.raises(VaultRequestRejected) as caught:
        await vault.create_token(TOKEN, (), 60, {})
    assert "CAESIJ" not in str(caught.value)
    assert str(caught.value).startswith("vault create_token: unknown role <redacted token>")
    assert "http" not in str(caught.value), "hvac's ', on post <Vault URL>' is not repeated to jobs or audit"
    role = str(uuid.uuid4())  # role_ids and secret_ids are UUIDs
    with pytest.raises(VaultRequestRejected) as caught:
        await vault.create_secret_id("approle", role)
    assert role not in str(caught.value) and role.upper() not in str(caught.value)
    assert "<redacted id>" in str(caught.value)


@pytest.mark.parametrize("exc", [
    KeyError(TOKEN), TypeError(f"bad {TOKEN}"), ValueError(OLD_TOKEN),
    requests.exceptions.InvalidHeader(f"Invalid return character or leading space in header: X-Vault-Token: {TOKEN}"),
    OSError(f"Could not find the TLS key file, invalid path: {TOKEN}"),
])
def test_an_exception_of_unknown_kind_is_named_not_quoted(exc: Exception) -> None:
    error = classify("renew_self", exc)
    assert isinstance(error, VaultUnavailable)
    assert str(error) == (f"vault renew_self: unexpected {type(exc).__name__} (its text is not shown: "
                          "it may contain a credential)")


def test_a_vault_error_of_no_known_class_keeps_its_redacted_text() -> None:
    error = classify("lookup_token", hx.UnexpectedError(f"teapot {TOKEN} {uuid.uuid4()}", method="post", url="u"))
    assert isinstance(error, VaultUnavailable)
    assert str(error) == "vault lookup_token: UnexpectedError: teapot <redacted token> <redacted id>"


@pytest.mark.parametrize(("answer", "missing"), [
    ({}, "auth"),
    ({"auth": None, "warnings": ["mfa required"]}, "auth"),
    ({"auth": {"accessor": "a"}}, "auth.client_token"),
    (requests.Response(), "auth"),  # hvac's answer to a 204
])
def test_a_malformed_login_answer_is_a_clear_vault_error(answer: object, missing: str) -> None:
    with pytest.raises(MalformedAnswer) as caught:
        _login(answer)
    error = classify("login_approle", caught.value)
    assert isinstance(error, VaultUnavailable)
    assert str(error) == f"vault login_approle: unexpected answer from Vault: it has no {missing}"


async def test_a_malformed_answer_is_classified_and_counted_like_any_failed_call(vault: VaultClient) -> None:
    with pytest.raises(VaultUnavailable, match="it has no auth"):
        await vault._call("login_approle", lambda: _login({"data": {}}))
    registry = vault._metrics.registry
    assert registry.get_sample_value("broker_vault_requests_total",
                                     {"operation": "login_approle", "outcome": "unavailable"}) == 1
