"""The two ways the dev setup reaches OpenBao make the same configuration: the ``bao`` CLI
(``broker dev``, the README's commands) and the HTTP requests the test suite sends instead
(``cli=False``, 0.2 s a command faster). Read back from a real OpenBao, both must be equal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from broker.devserver import OpenBaoDevServer, setup_approle, setup_token_role
from broker.errors import BrokerError


def _without(data: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in names}


def _setup_both_ways(server: OpenBaoDevServer, tmp_path: Path) -> dict[str, dict[str, Any]]:
    made = {}
    for way, cli in (("cli", True), ("http", False)):
        server.cli = cli
        setup_token_role(server, f"role-{way}", [f"pol-{way}"])
        setup_approle(server, [f"role-{way}"], tmp_path / way, role_name=f"broker-{way}", login_ttl="7m")
        server.cli = True
        made[way] = {
            "token_role": json.loads(server.bao("read", "-format=json", f"auth/token/roles/role-{way}"))["data"],
            "approle": json.loads(server.bao("read", "-format=json", f"auth/approle/role/broker-{way}"))["data"],
            "policy": server.bao("policy", "read", f"broker-{way}-policy"),
            "files": {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / way).iterdir()},
        }
    return made


def test_the_cli_and_its_http_requests_configure_openbao_alike(private_openbao: OpenBaoDevServer,
                                                                tmp_path: Path) -> None:
    made = _setup_both_ways(private_openbao, tmp_path)
    cli, http = made["cli"], made["http"]
    assert _without(cli["token_role"], "name", "allowed_policies") == _without(http["token_role"], "name",
                                                                                  "allowed_policies")
    assert (cli["token_role"]["allowed_policies"], http["token_role"]["allowed_policies"]) == (["pol-cli"],
                                                                                                ["pol-http"])
    assert cli["token_role"]["orphan"] is True and cli["token_role"]["renewable"] is False
    assert _without(cli["approle"], "token_policies") == _without(http["approle"], "token_policies")
    assert cli["approle"]["token_ttl"] == 420
    assert cli["policy"].replace("role-cli", "ROLE") == http["policy"].replace("role-http", "ROLE")
    assert cli["files"] == http["files"] == {"role_id": 0o600, "secret_id": 0o600}


def test_a_command_the_http_path_does_not_know_is_refused_not_guessed(private_openbao: OpenBaoDevServer) -> None:
    private_openbao.cli = False
    with pytest.raises(BrokerError, match="bao token create -policy=default: not a command this helper sends over HTTP; use cli=True"):
        private_openbao.bao("token", "create", "-policy=default")
    with pytest.raises(BrokerError, match=r"bao write auth/token/roles/x token_explicit_max_ttl=not-a-duration failed: 400 .*invalid duration"):
        private_openbao.bao("write", "auth/token/roles/x", "token_explicit_max_ttl=not-a-duration")


def test_the_http_path_goes_to_the_server_directly_whatever_http_proxy_says(
        private_openbao: OpenBaoDevServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bao CLI never proxies loopback; the requests carry the root token.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # the discard port: nothing answers
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    private_openbao.cli = False
    assert "path" in private_openbao.bao("policy", "read", "default")
