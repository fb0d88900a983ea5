"""`broker get` / `refresh` checks made before anything is sent: no broker is needed, since a
command refused here never reaches one (each test asserts the exit code and the one line)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from broker import cli


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
