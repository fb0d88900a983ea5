"""`broker get --refresh-file`, `broker refresh`, `broker release` as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest

from tests.conftest import RunningBroker, module_broker, token_is_valid
from tests.test_cli import assert_one_line_error, broker_cli, job_env, secrets_of

pytestmark = pytest.mark.asyncio(loop_scope="module")

PER_JOB = {"mode": "per-job", "ttl": "60s", "grace": "2s", "allow": ["cn:job"]}


b = module_broker("cli-families", {"deploy": PER_JOB, "capped": {**PER_JOB, "max_families_per_client": 1}})


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


async def test_get_without_a_refresh_file_starts_no_family(b: RunningBroker) -> None:
    """Nobody could refresh or release such a family: it would hold one of the certificate's
    max_families_per_client places until family_max_age (100 such runs locked the runner out)."""
    before = _created(b)
    run = await broker_cli("get", "deploy", env=job_env(b))
    assert_one_line_error(run, 2, "deploy is a per-job profile: keep its family's refresh token with --refresh-file",
                          "broker release --refresh-file")
    assert _created(b) == before


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


def _created(b: RunningBroker) -> float:
    return b.metric("broker_token_requests_total", profile="deploy", outcome="family_created") or 0.0


def _live_families(b: RunningBroker) -> set[str]:
    assert b.broker.families is not None
    return {family.id for family in b.broker.families.families}


async def test_get_into_a_missing_directory_starts_no_family(b: RunningBroker, tmp_path: Path) -> None:
    before = _created(b)
    target = tmp_path / "typo" / "deploy.refresh"
    run = await broker_cli("get", "deploy", "--refresh-file", str(target), env=job_env(b))
    assert_one_line_error(run, 2, "cannot write the refresh file", str(target), "does not exist")
    assert _created(b) == before, "checked before the POST: no family nobody holds"
    assert not target.parent.exists()


async def test_get_with_an_output_it_cannot_write_starts_no_family(b: RunningBroker, tmp_path: Path) -> None:
    """Without --refresh-file a family is never releasable, but it still should not be started
    for a token that cannot be delivered."""
    before = _created(b)
    target = tmp_path / "typo" / "token"
    run = await broker_cli("get", "deploy", "--output", str(target), env=job_env(b))
    assert_one_line_error(run, 2, "cannot write the --output file", str(target), "does not exist")
    assert _created(b) == before


async def test_a_refresh_file_that_is_a_symbolic_link_is_refused_before_anything_is_spent(
        b: RunningBroker, tmp_path: Path) -> None:
    before = _created(b)
    target = tmp_path / "elsewhere"
    link = tmp_path / "link.refresh"
    link.symlink_to(target)
    run = await broker_cli("get", "deploy", "--refresh-file", str(link), env=job_env(b))
    assert_one_line_error(run, 2, f"the refresh file {link} is a symbolic link")
    assert _created(b) == before and link.is_symlink() and not target.exists()
    refresh_file = tmp_path / "deploy.refresh"
    assert (await broker_cli("get", "deploy", "--refresh-file", str(refresh_file), env=job_env(b))).code == 0
    kept = refresh_file.read_text()
    _kept(refresh_file, b)
    link.unlink()
    link.symlink_to(refresh_file)
    run = await broker_cli("refresh", "--refresh-file", str(link), env=job_env(b))
    assert_one_line_error(run, 2, f"the refresh file {link} is a symbolic link")
    assert refresh_file.read_text() == kept and link.is_symlink(), "nothing spent, nothing replaced"
    assert (await broker_cli("release", "--refresh-file", str(refresh_file), env=job_env(b))).code == 0


@pytest.mark.parametrize("command", ["get", "refresh"])
async def test_one_file_for_output_and_refresh_file_is_refused(b: RunningBroker, tmp_path: Path, command: str) -> None:
    refresh_file = tmp_path / "deploy.refresh"
    if command == "refresh":
        assert (await broker_cli("get", "deploy", "--refresh-file", str(refresh_file), env=job_env(b))).code == 0
        _kept(refresh_file, b)
    before = _created(b)
    args = ["deploy"] if command == "get" else []
    run = await broker_cli(command, *args, "--refresh-file", str(refresh_file), "--output",
                           str(tmp_path / "." / "deploy.refresh"), env=job_env(b))
    assert_one_line_error(run, 2, "--output and --refresh-file are the same file", "needs a file of its own")
    assert _created(b) == before
    if command == "refresh":
        assert (await broker_cli("release", "--refresh-file", str(refresh_file), env=job_env(b))).code == 0


async def test_min_ttl_on_a_per_job_profile_is_a_usage_error(b: RunningBroker) -> None:
    before = _created(b)
    run = await broker_cli("get", "deploy", "--min-ttl", "10h", env=job_env(b))
    assert_one_line_error(run, 2, "--min-ttl does not apply to deploy, a per-job profile", "broker refresh")
    assert _created(b) == before, "no family started"


async def test_min_ttl_with_a_refresh_file_is_a_usage_error_before_anything_starts(b: RunningBroker,
                                                                                     tmp_path: Path) -> None:
    before = _created(b)
    refresh_file = tmp_path / "deploy.refresh"
    run = await broker_cli("get", "deploy", "--min-ttl", "10s", "--refresh-file", str(refresh_file), env=job_env(b))
    assert_one_line_error(run, 2, "--min-ttl is for shared profiles", "--refresh-file starts a per-job family")
    assert _created(b) == before and not refresh_file.exists(), "no family started"


async def test_refresh_with_an_output_it_cannot_write_spends_nothing(b: RunningBroker, tmp_path: Path) -> None:
    refresh_file = tmp_path / "deploy.refresh"
    assert (await broker_cli("get", "deploy", "--refresh-file", str(refresh_file), env=job_env(b))).code == 0
    kept = refresh_file.read_text()
    run = await broker_cli("refresh", "--refresh-file", str(refresh_file), "--output", str(tmp_path / "no" / "t"),
                           env=job_env(b))
    assert_one_line_error(run, 2, "cannot write the --output file", "does not exist",
                          secrets=[json.loads(kept)["refresh_token"]])
    assert refresh_file.read_text() == kept, "the refresh token was not spent"
    _kept(refresh_file, b)
    assert (await broker_cli("refresh", "--refresh-file", str(refresh_file), env=job_env(b))).code == 0
    assert (await broker_cli("release", "--refresh-file", str(refresh_file), env=job_env(b))).code == 0


async def test_get_into_a_path_under_a_file_starts_no_family(b: RunningBroker, tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    before = _created(b)
    run = await broker_cli("get", "deploy", "--refresh-file", str(tmp_path / "plain" / "f"), env=job_env(b))
    assert_one_line_error(run, 2, "cannot use", "as the refresh file", "Not a directory")
    assert _created(b) == before


async def test_get_where_the_trial_write_fails_starts_no_family(b: RunningBroker, tmp_path: Path) -> None:
    # The trial write is a temp file beside the target, as the real write is. A name that is
    # legal but leaves no room for the temp file's prefix and suffix makes that write fail
    # for any user, root included (a read-only directory would not stop root).
    target = tmp_path / ("r" * 250)
    before = _created(b)
    run = await broker_cli("get", "deploy", "--refresh-file", str(target), env=job_env(b))
    assert_one_line_error(run, 2, "cannot write the refresh file", "File name too long")
    assert _created(b) == before and not target.exists()


async def test_get_refuses_a_refresh_file_that_already_holds_one(b: RunningBroker, tmp_path: Path) -> None:
    refresh_file = tmp_path / "deploy.refresh"
    assert (await broker_cli("get", "deploy", "--refresh-file", str(refresh_file), env=job_env(b))).code == 0
    kept = refresh_file.read_text()
    before = _created(b)
    run = await broker_cli("get", "deploy", "--refresh-file", str(refresh_file), env=job_env(b))
    assert_one_line_error(run, 2, str(refresh_file), "not empty", f"broker release --refresh-file {refresh_file}",
                          "another file", secrets=[json.loads(kept)["refresh_token"]])
    assert _created(b) == before and refresh_file.read_text() == kept, "the earlier family can still be released"
    _kept(refresh_file, b)
    assert (await broker_cli("release", "--refresh-file", str(refresh_file), env=job_env(b))).code == 0


async def test_get_uses_an_empty_refresh_file_such_as_mktemp_makes(b: RunningBroker, tmp_path: Path) -> None:
    refresh_file = tmp_path / "from-mktemp"
    refresh_file.touch(mode=0o600)
    run = await broker_cli("get", "deploy", "--refresh-file", str(refresh_file), env=job_env(b))
    assert run.code == 0, run
    b.seen_secrets.add(run.out.strip())
    assert _kept(refresh_file, b)["generation"] == 1
    assert (await broker_cli("release", "--refresh-file", str(refresh_file), env=job_env(b))).code == 0


async def test_get_refuses_a_refresh_file_that_is_not_a_regular_file(b: RunningBroker, tmp_path: Path) -> None:
    # Never a device here: the atomic write renames over the path, and as root it would replace
    # /dev/null with a file (this check is what stops that).
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    before = _created(b)
    for path in (fifo, tmp_path):
        run = await broker_cli("get", "deploy", "--refresh-file", str(path), env=job_env(b))
        assert_one_line_error(run, 2, str(path), "not a regular file")
    assert _created(b) == before
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


async def test_a_refresh_file_that_cannot_be_written_after_the_post_releases_the_family(
        b: RunningBroker, tmp_path: Path) -> None:
    """The check before the POST can be overtaken (the directory removed meanwhile): then the
    family just started is released instead of left with a token nobody holds."""
    from broker import cli
    from broker.client import BrokerClient, ClientConfig

    cert, key = b.pki.pair("job")
    client = BrokerClient(ClientConfig(url=b.url, cert=cert, key=key, ca=b.pki.ca), sleep=lambda _: None)
    body = await asyncio.to_thread(client.start_family, "deploy")
    token = str(body["token"])
    b.seen_secrets.update((token, str(body["refresh_token"])))
    assert body["family"] in _live_families(b)
    gone = tmp_path / "removed" / "deploy.refresh"
    with pytest.raises(cli._Failure) as failure:
        await asyncio.to_thread(cli._keep_or_release, client, gone, body)
    message = str(failure.value)
    assert "cannot write the refresh file" in message and "released the family just started" in message
    assert token not in message and str(body["refresh_token"]) not in message
    assert body["family"] not in _live_families(b)
    assert not token_is_valid(b.vault, token)


async def test_release_of_a_family_that_already_ended_sets_the_file_aside(b: RunningBroker, tmp_path: Path) -> None:
    """A family revoked as reused (or expired, or ended by an admin) cannot be released: exit 1,
    but the file moves aside so the job's next broker get can use the path (it used to stay, and
    broker get refused the non-empty file: a loop). Moved, not deleted: when another certificate
    started the family (a renewed one), the file is the only way to end it."""
    refresh_file = tmp_path / "deploy.refresh"
    assert (await broker_cli("get", "deploy", "--refresh-file", str(refresh_file), env=job_env(b))).code == 0
    kept = _kept(refresh_file, b)
    stolen = tmp_path / "stolen.refresh"
    stolen.write_text(refresh_file.read_text())
    os.chmod(stolen, 0o600)
    run = await broker_cli("refresh", "--refresh-file", str(stolen), env=job_env(b, cert="job-other"))
    assert_one_line_error(run, 1, "401", "refresh_token_reused")
    run = await broker_cli("release", "--refresh-file", str(refresh_file), env=job_env(b))
    aside = tmp_path / "deploy.refresh.ended"
    assert_one_line_error(run, 1, "404", f"no live token family {kept['family']!r}", f"moved the refresh file to {aside}",
                          secrets=secrets_of(b))
    assert not refresh_file.exists() and json.loads(aside.read_text())["family"] == kept["family"]
    assert stat.S_IMODE(aside.stat().st_mode) == 0o600
    run = await broker_cli("get", "deploy", "--refresh-file", str(refresh_file), env=job_env(b))
    assert run.code == 0, run
    b.seen_secrets.add(run.out.strip())
    _kept(refresh_file, b)


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "huge"])
@pytest.mark.parametrize("command", ["refresh", "release"])
async def test_refresh_file_that_is_not_a_small_regular_file_is_refused(b: RunningBroker, tmp_path: Path,
                                                                        command: str, kind: str) -> None:
    path = {"device": Path("/dev/zero"), "fifo": tmp_path / "fifo", "directory": tmp_path,
            "huge": tmp_path / "huge"}[kind]
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes to it: reading it would wait forever
    if kind == "huge":
        path.write_text('{"family": "x", "refresh_token": "' + "y" * 100_000 + '"}')
    run = await broker_cli(command, "--refresh-file", str(path), env=job_env(b), timeout=15)
    problem = "larger than" if kind == "huge" else "not a regular file"
    assert_one_line_error(run, 2, str(path), problem)


async def test_broker_revoke_of_a_per_job_profile_ends_its_families(b: RunningBroker, tmp_path: Path) -> None:
    """Last in this module: it ends every family of the profile, the other tests' too."""
    refresh_file = tmp_path / "deploy.refresh"
    run = await broker_cli("get", "deploy", "--refresh-file", str(refresh_file), env=job_env(b))
    assert run.code == 0, run
    token = run.out.strip()
    b.seen_secrets.add(token)
    _kept(refresh_file, b)
    run = await broker_cli("revoke", "deploy", env=job_env(b, "ops"))
    assert run.code == 0, run
    body = json.loads(run.out)
    assert body["profile"] == "deploy" and body["families_revoked"] >= 1 and body["pending_revocations"] == 0
    assert not token_is_valid(b.vault, token)
    run = await broker_cli("refresh", "--refresh-file", str(refresh_file), env=job_env(b))
    assert_one_line_error(run, 1, "refresh_token_invalid", secrets=secrets_of(b))


async def test_get_past_the_family_limit_says_so_once_and_is_not_retried(b: RunningBroker, tmp_path: Path) -> None:
    first = tmp_path / "first.refresh"
    assert (await broker_cli("get", "capped", "--refresh-file", str(first), env=job_env(b))).code == 0
    _kept(first, b)
    second = tmp_path / "second.refresh"
    run = await broker_cli("get", "capped", "--refresh-file", str(second), env=job_env(b))
    assert_one_line_error(run, 1, "409", "too_many_families", "already holds 1 live token families of profile capped")
    assert not second.exists() or second.read_text() == ""
    assert b.metric("broker_token_requests_total", profile="capped", outcome="family_limit") == 1, "not retried"
    assert (await broker_cli("release", "--refresh-file", str(first), env=job_env(b))).code == 0
    run = await broker_cli("get", "capped", "--refresh-file", str(second), env=job_env(b))
    assert run.code == 0, run
    b.seen_secrets.add(run.out.strip())
    _kept(second, b)
