"""`broker get` / `refresh` checks made before anything is sent: no broker is needed, since a
command refused here never reaches one (each test asserts the exit code and the one line)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from broker import cli
from tests.conftest import Pki, write_config
from tests.test_cli import broker_cli


# --- what is checked before anything is fetched ---------------------------------------------

@pytest.mark.parametrize(("value", "problem"), [
    ("9" * 400, "is more than 366 days"),  # parses as inf: math.ceil(inf) crashed with a traceback
    ("99999999999999999999999h", "is more than 366 days"),
])
def test_a_min_ttl_no_token_can_have_is_a_usage_error(value: str, problem: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["get", "demo", "--min-ttl", value]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("broker get: --min-ttl: ") and problem in captured.err


def test_a_closed_stdout_is_a_usage_error_before_the_fetch(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdout", None)  # what `broker get demo >&-` gives Python
    assert cli.main(["get", "demo"]) == 2
    assert capsys.readouterr().err == "broker get: stdout is closed; use --output FILE\n"


def test_a_closed_stderr_under_github_actions_puts_nothing_on_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", None)  # `2>&-`: the ::add-mask:: line has nowhere to go
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    assert cli.main(["get", "demo"]) == 2
    assert out.getvalue() == "", "neither the mask line nor the error may land in $(broker get ...)"


@pytest.mark.parametrize("command", ["get", "rotate", "revoke"])
@pytest.mark.parametrize("name", ["", "Demo", "../v1/whoami", "x" * 64])
def test_a_profile_name_no_config_accepts_is_a_usage_error(command: str, name: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, name])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a profile name (up to 63 lowercase letters" in err, err


def test_a_client_file_that_is_a_directory_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "job.key").write_text("")
    (tmp_path / "ca.pem").write_text("")
    monkeypatch.setenv("BROKER_CERT", str(tmp_path))
    monkeypatch.setenv("BROKER_KEY", str(tmp_path / "job.key"))
    monkeypatch.setenv("BROKER_CA", str(tmp_path / "ca.pem"))
    assert cli.main(["get", "demo"]) == 2
    assert capsys.readouterr().err == (f"broker get: BROKER_CERT {tmp_path} is not a regular file (a directory or "
                                       "device?); give the PEM file's path\n")


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"broker {version('token-broker')}\n"


def test_check_refuses_a_place_serve_could_not_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file where the state directory should be: serve would fail at its first write."""
    blocker = tmp_path / "var"
    blocker.write_text("not a directory\n")
    assert cli._not_writable(blocker / "state", is_file=False) == (
        f"{blocker} is a file, so {blocker / 'state'} cannot be created")
    assert cli._not_writable(tmp_path / "new" / "deeper", is_file=False) is None  # created at start
    assert cli._not_writable(blocker, is_file=False) == f"{blocker} exists and is not a directory"
    assert cli._not_writable(tmp_path, is_file=True) == f"{tmp_path} is a directory, not a file"
    # As another user (the tests run as root, for whom every directory is writable):
    denied = {tmp_path}
    monkeypatch.setattr(cli.os, "access", lambda path, mode: Path(path) not in denied)
    problem = cli._not_writable(tmp_path / "audit" / "audit.jsonl", is_file=True)
    assert problem is not None and problem.startswith(
        f"cannot create {tmp_path / 'audit' / 'audit.jsonl'}: no write access to {tmp_path} as this user")
    assert "run broker check as the broker's user" in problem


async def test_broker_check_refuses_a_state_dir_it_could_not_create(pki: Pki, tmp_path: Path) -> None:
    config = write_config(tmp_path, pki, "http://127.0.0.1:8200", [{"method": "token", "token_env": "T"}],
                          {"demo": {"token_role": "r", "policies": ["p"], "ttl": "1h", "grace": "5m",
                                    "allow": ["cn:job"]}})
    (tmp_path / "blocker").write_text("a file\n")
    config.write_text(config.read_text().replace('dir = "state"', 'dir = "blocker/state"'))
    ran = await broker_cli("check", "--config", str(config))
    assert ran.code == 2 and ran.out == "", ran
    assert ran.err.strip() == f"{config}: state.dir: {tmp_path / 'blocker'} is a file, so " \
                              f"{tmp_path / 'blocker' / 'state'} cannot be created", ran
