"""`broker get` / `refresh` checks made before anything is sent: no broker is needed, since a
command refused here never reaches one (each test asserts the exit code and the one line)."""

from __future__ import annotations

import io
import sys

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
