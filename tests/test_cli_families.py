"""`broker get --refresh-file`, `broker refresh`, `broker release` as real processes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.conftest import RunningBroker, module_broker, token_is_valid
from tests.test_cli import assert_one_line_error, broker_cli, job_env

pytestmark = pytest.mark.asyncio(loop_scope="module")

PER_JOB = {"mode": "per-job", "ttl": "60s", "grace": "2s", "rotate_after": "40s", "allow": ["cn:job"]}


b = module_broker("cli-families", {"deploy": PER_JOB})


def _kept(path: Path, b: RunningBroker) -> dict[str, object]:
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data = json.loads(path.read_text())
    b.seen_secrets.add(str(data["refresh_token"]))
    return data  # type: ignore[no-any-return]


async def test_get_refresh_release_through_a_refresh_file(b: RunningBroker, tmp_path: Path) -> None:
    refresh_file = tmp_path / "deploy.refresh"
    run = await broker_cli("get", "deploy", "--refresh-file", str(refresh_file), "--format", "json", env=job_env(b))
    assert run.code == 0, run
    first = json.loads(run.out)
    b.seen_secrets.add(first["token"])
    assert "refresh_token" not in first, "the refresh token goes to the file only"
    assert first["generation"] == 1 and token_is_valid(b.vault, first["token"])
    kept = _kept(refresh_file, b)
    assert kept["family"] == first["family"] and kept["refresh_token"] not in run.out + run.err

    run = await broker_cli("refresh", "--refresh-file", str(refresh_file), env=job_env(b))
    assert run.code == 0, run
    second = run.out.strip()
    b.seen_secrets.add(second)
    assert second != first["token"] and token_is_valid(b.vault, second)
    assert _kept(refresh_file, b)["generation"] == 2
    assert _kept(refresh_file, b)["refresh_token"] != kept["refresh_token"]

    run = await broker_cli("release", "--refresh-file", str(refresh_file), env=job_env(b))
    assert run.code == 0, run
    assert json.loads(run.out) == {"family": first["family"], "profile": "deploy", "revoked": True,
                                    "pending_revocations": 0}
    assert not refresh_file.exists()
    assert not token_is_valid(b.vault, second) and not token_is_valid(b.vault, first["token"])


async def test_get_without_a_refresh_file_still_starts_a_family(b: RunningBroker) -> None:
    run = await broker_cli("get", "deploy", env=job_env(b))
    assert run.code == 0, run
    token = run.out.strip()
    b.seen_secrets.add(token)
    assert token_is_valid(b.vault, token)
    assert "per-job profile" in run.err and "--refresh-file" in run.err


async def test_reused_refresh_file_is_refused_and_revokes(b: RunningBroker, tmp_path: Path) -> None:
    refresh_file = tmp_path / "deploy.refresh"
    assert (await broker_cli("get", "deploy", "--refresh-file", str(refresh_file), env=job_env(b))).code == 0
    stolen = refresh_file.read_text()
    _kept(refresh_file, b)
    assert (await broker_cli("refresh", "--refresh-file", str(refresh_file), env=job_env(b))).code == 0
    copy = tmp_path / "stolen.refresh"
    copy.write_text(stolen)
    os.chmod(copy, 0o600)
    # Within the default reuse_interval a same-cert replay is a retry; from another cert it is theft.
    run = await broker_cli("refresh", "--refresh-file", str(copy), env=job_env(b, cert="job-other"))
    assert_one_line_error(run, 1, "401", "refresh_token_reused")
    run = await broker_cli("refresh", "--refresh-file", str(refresh_file), env=job_env(b))
    assert_one_line_error(run, 1, "401", "refresh_token_invalid")


async def test_bad_refresh_files(b: RunningBroker, tmp_path: Path) -> None:
    missing = await broker_cli("refresh", "--refresh-file", str(tmp_path / "nope"), env=job_env(b))
    assert_one_line_error(missing, 2, "cannot read the refresh file")
    garbage = tmp_path / "garbage"
    garbage.write_text("{not json")
    run = await broker_cli("release", "--refresh-file", str(garbage), env=job_env(b))
    assert_one_line_error(run, 2, "is not a refresh file")
