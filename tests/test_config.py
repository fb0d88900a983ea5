"""broker.config: durations, loading, and one test per class of configuration problem."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from broker.cli import main as broker_main
from broker.config import (
    DEFAULT_CIPHERSUITES,
    AuthConfig,
    check_config,
    check_secret_file_mode,
    credential_problem,
    credential_text,
    default_rotate_after,
    format_duration,
    load_config,
    parse_duration,
)
from broker.errors import ConfigError, url_without_secrets
from tests.conftest import Pki

# Mirrors DESIGN §5, minus rotate_after (so the default is exercised) and with a per-job profile.
VALID = """\
[server]
listen = "127.0.0.1:8443"
cert = "certs/server.pem"
key = "certs/server.key"
client_ca = "certs/ca.pem"
tls13_ciphersuites = ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"]

[ops]
listen = "127.0.0.1:9090"

[audit]
path = "audit.jsonl"

[state]
dir = "state"

[vault]
address = "http://127.0.0.1:8200"
ca_cert = ""
timeout = "5s"

[[vault.auth]]
method = "approle"
role_id_file = "secrets/role_id"
secret_id_file = "secrets/secret_id"

[[vault.auth]]
method = "token"
token_file = "secrets/token"

[admin]
allow = ["cn:ops-*"]

[profiles.deploy]
mode = "shared"
token_role = "ci-deploy"
policies = ["deploy"]
ttl = "1h"
grace = "15m"
allow = ["uri:spiffe://ci.example/runner/*", "cn:job-*"]
check_interval = "60s"
alert_threshold = 2

[profiles.jobs]
mode = "per-job"
token_role = "ci-jobs"
ttl = "10m"
grace = "1m"
allow = ["dns:*.runners.example"]
reuse_interval = "20s"
"""

TOKEN = "hvs.CAESIJx9aZ3vQ0hY5xkP2mWnT8rLbD"  # token-shaped, never a real one


def _write(path: Path, text: str = "dummy\n", mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


def _setup(tmp_path: Path, text: str = VALID) -> Path:
    """Write the config and every file it names; secret files get 0600."""
    _write(tmp_path / "certs/server.pem")
    _write(tmp_path / "certs/ca.pem")
    _write(tmp_path / "certs/server.key", mode=0o600)
    _write(tmp_path / "secrets/role_id")
    _write(tmp_path / "secrets/secret_id", mode=0o600)
    _write(tmp_path / "secrets/token", mode=0o600)
    _write(tmp_path / "certs/vault-client.pem")
    _write(tmp_path / "certs/vault-client.key", mode=0o600)
    config = tmp_path / "broker.toml"
    config.write_text(text)
    return config


def _mutated(old: str, new: str, text: str = VALID) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def _problems(tmp_path: Path, text: str) -> list[str]:
    """The problems of ``text``, checking load_config and check_config agree."""
    config = _setup(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert check_config(config) == caught.value.problems
    return caught.value.problems


def _only_problem(tmp_path: Path, text: str) -> str:
    problems = _problems(tmp_path, text)
    assert len(problems) == 1, problems
    return problems[0]


# --- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("1h", 3600),
        ("1h30m", 5400),
        ("500ms", 0.5),
        ("2d", 172800),
        ("1m30.5s", 90.5),
        ("30", 30),
        (30, 30),
        ("0s", 0),
        (" 5m ", 300),
    ],
)
def test_parse_duration_accepts(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "'abc' is not a duration; use a number with a unit, like 90s, 15m or 1h"),
        ("", "an empty string is not a duration"),
        ("-5s", "'-5s' is negative"),
        (-5, "-5 is negative"),
        ("15 m", "is not a duration"),
        ("1h1h", "is not a duration"),
        ("30m1h", "is not a duration"),
        ("5M", "is not a duration"),
        ("1.h", "is not a duration"),
        (True, "is not a duration"),
    ],
)
def test_parse_duration_rejects(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_duration(text)  # type: ignore[arg-type]


def test_parse_duration_error_hides_token() -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(TOKEN)
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(2400, "40m"), (3600, "1h"), (5400, "1h30m"), (4, "4s"), (2904, "48m24s"), (0.5, "500ms"),
     (0, "0s"), (90.5, "1m30.5s"), (86400, "24h"), (3604, "1h4s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_default_rotate_after() -> None:
    assert default_rotate_after(3600, 900) == pytest.approx(2400)
    # Second-scale TTLs: margin is ttl/10, and the jittered rotation plus grace still fits.
    rotate = default_rotate_after(10, 2)
    assert 0 < rotate and rotate * 1.1 + 2 <= 10
    # Where ttl - grace - margin is the smaller term, jitter is accounted for too.
    rotate = default_rotate_after(3600, 1500)
    assert rotate * 1.1 + 1500 <= 3600


# --- a valid config ---------------------------------------------------------------------------


def test_valid_config_loads(tmp_path: Path) -> None:
    config = load_config(_setup(tmp_path))

    assert config.source == tmp_path / "broker.toml"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8443)
    assert config.server.cert == tmp_path / "certs/server.pem"
    assert config.server.key == tmp_path / "certs/server.key"
    assert config.server.client_ca == tmp_path / "certs/ca.pem"
    assert config.server.tls13_ciphersuites == DEFAULT_CIPHERSUITES
    assert config.server.max_body_bytes == 64 * 1024
    assert config.server.handshake_timeout == 10.0
    assert (config.ops.host, config.ops.port) == ("127.0.0.1", 9090)
    assert config.audit.path == tmp_path / "audit.jsonl"
    assert config.state.dir == tmp_path / "state"
    assert config.vault.address == "http://127.0.0.1:8200"
    assert config.vault.ca_cert is None
    assert config.vault.timeout == 5.0
    assert config.vault.auth == (
        AuthConfig(
            method="approle",
            mount="approle",
            role_id_file=tmp_path / "secrets/role_id",
            secret_id_file=tmp_path / "secrets/secret_id",
        ),
        AuthConfig(method="token", token_file=tmp_path / "secrets/token"),
    )
    assert config.admin.allow == ("cn:ops-*",)

    deploy = config.profiles["deploy"]
    assert deploy.name == "deploy"
    assert deploy.mode == "shared"
    assert deploy.token_role == "ci-deploy"
    assert deploy.policies == ("deploy",)
    assert (deploy.ttl, deploy.grace) == (3600.0, 900.0)
    assert deploy.rotate_after == pytest.approx(2400.0)  # 40m, the default
    assert deploy.allow == ("uri:spiffe://ci.example/runner/*", "cn:job-*")
    assert (deploy.check_interval, deploy.alert_threshold) == (60.0, 2)

    jobs = config.profiles["jobs"]
    assert jobs.mode == "per-job"
    assert jobs.policies == ()
    assert (jobs.reuse_interval, jobs.family_max_age, jobs.max_families_per_client) == (20.0, 86400.0, 100)
    assert isinstance(jobs.allow, tuple)
    assert check_config(tmp_path / "broker.toml") == []


def test_defaults_for_optional_sections(tmp_path: Path) -> None:
    text = VALID
    for section in ('[ops]\nlisten = "127.0.0.1:9090"\n', '[audit]\npath = "audit.jsonl"\n',
                    '[state]\ndir = "state"\n', '[admin]\nallow = ["cn:ops-*"]\n'):
        text = _mutated(section, "", text)
    text = _mutated('tls13_ciphersuites = ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"]\n',
                    "", text)
    text = _mutated('grace = "15m"\n', "", text)
    config = load_config(_setup(tmp_path, text))
    assert (config.ops.host, config.ops.port) == ("127.0.0.1", 9090)
    assert config.audit.path == tmp_path / "audit.jsonl"
    assert config.state.dir == tmp_path / "state"
    assert config.admin.allow == ()
    assert config.server.tls13_ciphersuites == DEFAULT_CIPHERSUITES
    assert config.profiles["deploy"].grace == 900.0


def test_explicit_values_and_ipv6_listen(tmp_path: Path) -> None:
    text = _mutated('listen = "127.0.0.1:8443"', 'listen = "[::1]:8443"\nmax_body_bytes = 1024\n'
                    'handshake_timeout = "3s"')
    text = _mutated('ca_cert = ""', 'ca_cert = "certs/ca.pem"', text)
    text = _mutated('grace = "15m"', 'grace = "15m"\nrotate_after = "30m"', text)
    text = _mutated('path = "audit.jsonl"', 'path = "/var/log/broker/audit.jsonl"', text)
    config = load_config(_setup(tmp_path, text))
    assert (config.server.host, config.server.port) == ("::1", 8443)
    assert (config.server.max_body_bytes, config.server.handshake_timeout) == (1024, 3.0)
    assert config.vault.ca_cert == tmp_path / "certs/ca.pem"
    assert config.profiles["deploy"].rotate_after == 1800.0
    assert config.audit.path == Path("/var/log/broker/audit.jsonl")


def test_cert_auth_and_approle_options(tmp_path: Path) -> None:
    text = _mutated('secret_id_file = "secrets/secret_id"',
                    'secret_id_file = "secrets/secret_id"\nmount = "ci-approle"\n'
                    'rotate_secret_id = "24h"')
    text += ('\n[[vault.auth]]\nmethod = "cert"\ncert_file = "certs/vault-client.pem"\n'
             'key_file = "certs/vault-client.key"\ncert_role = "broker"\n')
    # Keep [[vault.auth]] inside [vault]: TOML arrays of tables may follow other tables.
    auth = load_config(_setup(tmp_path, text)).vault.auth
    assert (auth[0].mount, auth[0].rotate_secret_id) == ("ci-approle", 86400.0)
    assert auth[2] == AuthConfig(
        method="cert",
        mount="cert",
        cert_file=tmp_path / "certs/vault-client.pem",
        key_file=tmp_path / "certs/vault-client.key",
        cert_role="broker",
    )


def test_token_env_auth(tmp_path: Path) -> None:
    text = _mutated('token_file = "secrets/token"', 'token_env = "VAULT_TOKEN"')
    auth = load_config(_setup(tmp_path, text)).vault.auth[1]
    assert (auth.token_env, auth.token_file) == ("VAULT_TOKEN", None)


def test_second_scale_ttl_profile_loads(tmp_path: Path) -> None:
    text = _mutated('ttl = "1h"\ngrace = "15m"', 'ttl = "10s"\ngrace = "2s"')
    profile = load_config(_setup(tmp_path, text)).profiles["deploy"]
    assert 0 < profile.rotate_after and profile.rotate_after * 1.1 + 2 <= 10


# --- the file itself --------------------------------------------------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert check_config(missing) == [f"{missing}: config file does not exist"]


def test_invalid_toml_is_one_problem_with_line(tmp_path: Path) -> None:
    problem = _only_problem(tmp_path, _mutated('ttl = "1h"', 'ttl = "1h'))
    assert problem.startswith(f"{tmp_path / 'broker.toml'}: invalid TOML: ")
    line = VALID[: VALID.index('ttl = "1h"')].count("\n") + 1
    assert f"(at line {line}, column 10)" in problem


# --- unknown keys and types -------------------------------------------------------------------


def test_unknown_key_with_suggestion(tmp_path: Path) -> None:
    # The misspelt ttl is also missing; both are reported.
    assert _problems(tmp_path, _mutated('ttl = "1h"', 'tll = "1h"')) == [
        "profiles.deploy.ttl: required key is missing",
        "unknown key 'profiles.deploy.tll'; did you mean 'ttl'?",
    ]
    text = _mutated('check_interval = "60s"', 'check_interval = "60s"\ngrase = "1m"')
    assert _only_problem(tmp_path, text) == "unknown key 'profiles.deploy.grase'; did you mean 'grace'?"


def test_unknown_key_without_suggestion_and_unknown_section(tmp_path: Path) -> None:
    text = _mutated('[ops]', '[metrics]\nport = 9\n\n[ops]\nzzz = 1')
    problems = _problems(tmp_path, text)
    assert "unknown key 'ops.zzz'" in problems
    assert "unknown key 'metrics'" in problems


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('listen = "127.0.0.1:8443"', 'listen = "127.0.0.1:8443"\nmax_body_bytes = "64k"',
         "server.max_body_bytes: expected an integer, got a string ('64k')"),
        ('ttl = "1h"', "ttl = true", "profiles.deploy.ttl: expected a duration like 15m, got a boolean"),
        ('policies = ["deploy"]', 'policies = "deploy"',
         "profiles.deploy.policies: expected a list, got a string ('deploy')"),
        ('policies = ["deploy"]', "policies = [1]",
         "profiles.deploy.policies[0]: expected a string, got an integer (1)"),
        ('token_role = "ci-deploy"', "token_role = { name = 'x' }",
         "profiles.deploy.token_role: expected a string, got a table"),
        ('alert_threshold = 2', "alert_threshold = 1.5",
         "profiles.deploy.alert_threshold: expected an integer, got a number (1.5)"),
    ],
)
def test_wrong_types(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert _only_problem(tmp_path, _mutated(old, new)) == expected


def test_section_of_wrong_type(tmp_path: Path) -> None:
    text = "ops = 5\n" + _mutated('[ops]\nlisten = "127.0.0.1:9090"\n', "")
    assert _only_problem(tmp_path, text) == "ops: expected a table, got an integer (5)"
    text = "profiles = 5\n" + VALID.split("[profiles.deploy]")[0]
    assert _only_problem(tmp_path, text) == "profiles: expected a table, got an integer (5)"


def test_vault_auth_must_be_array_of_tables(tmp_path: Path) -> None:
    text = VALID.split("[[vault.auth]]")[0] + '[vault.auth]\nmethod = "token"\n\n[admin]' + \
        VALID.split("[admin]")[1]
    assert _only_problem(tmp_path, text) == (
        "vault.auth: expected an array of tables; write [[vault.auth]] with two brackets"
    )


# --- required keys ----------------------------------------------------------------------------


def test_required_keys_and_sections(tmp_path: Path) -> None:
    text = _mutated('cert = "certs/server.pem"\n', "")
    text = _mutated('address = "http://127.0.0.1:8200"\n', "", text)
    assert _problems(tmp_path, text) == [
        "server.cert: required key is missing",
        "vault.address: required key is missing",
    ]


def test_missing_server_section_is_one_problem(tmp_path: Path) -> None:
    text = VALID.split("[ops]")[1]
    assert _problems(tmp_path, "[ops]" + text) == ["server: required section [server] is missing"]


def test_no_vault_auth_and_no_profiles(tmp_path: Path) -> None:
    text = VALID.split("[[vault.auth]]")[0] + "[admin]" + VALID.split("[admin]")[1].split(
        "[profiles.deploy]")[0]
    assert _problems(tmp_path, text) == [
        "vault.auth: at least one [[vault.auth]] entry is required",
        "profiles: at least one [profiles.<name>] section is required",
    ]


# --- files ------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    config = _setup(tmp_path)
    (tmp_path / "certs/server.pem").unlink()
    problem = check_config(config)
    assert problem == [
        f"server.cert: file certs/server.pem does not exist (resolved to {tmp_path}/certs/server.pem)"
    ]


def test_file_that_is_a_directory(tmp_path: Path) -> None:
    problem = _only_problem(tmp_path, _mutated('client_ca = "certs/ca.pem"', 'client_ca = "certs"'))
    assert problem.startswith("server.client_ca: certs is not a regular file")


def _without_dac_override() -> None:
    """In the child, before exec: drop root's power to read any file (CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH) from the bounding set, so a mode-000 file is unreadable even as root."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unreadable_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = _setup(tmp_path)
    os.chmod(tmp_path / "certs/ca.pem", 0o000)
    script = "import sys; from broker.config import check_config; print('\\n'.join(check_config(sys.argv[1])))"
    done = subprocess.run([sys.executable, "-c", script, str(config)], capture_output=True, text=True,
                          preexec_fn=_without_dac_override if os.geteuid() == 0 else None, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith(
        "server.client_ca: file certs/ca.pem is not readable: Permission denied"
    )


def test_relative_paths_resolve_against_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    config = _setup(tmp_path)
    monkeypatch.chdir("/")
    assert load_config(config).server.cert == tmp_path / "certs/server.pem"


@pytest.mark.parametrize(
    ("key", "file"),
    [("server.key", "certs/server.key"), ("vault.auth[0].secret_id_file", "secrets/secret_id"),
     ("vault.auth[1].token_file", "secrets/token")],
)
def test_secret_file_readable_by_others(tmp_path: Path, key: str, file: str) -> None:
    config = _setup(tmp_path)
    os.chmod(tmp_path / file, 0o644)
    assert check_config(config) == [
        f"{key}: secret file {tmp_path / file} has mode 0644, so group or others can access it; "
        f"run chmod 600 {tmp_path / file}"
    ]


def test_cert_auth_key_file_mode(tmp_path: Path) -> None:
    text = VALID.replace('method = "token"\ntoken_file = "secrets/token"',
                         'method = "cert"\ncert_file = "certs/vault-client.pem"\n'
                         'key_file = "certs/vault-client.key"')
    config = _setup(tmp_path, text)
    os.chmod(tmp_path / "certs/vault-client.key", 0o640)
    (problem,) = check_config(config)
    assert problem.startswith("vault.auth[1].key_file: secret file")
    assert "mode 0640" in problem and "chmod 600" in problem


def test_check_secret_file_mode(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    _write(secret, mode=0o600)
    assert check_secret_file_mode(secret) is None
    os.chmod(secret, 0o604)
    assert check_secret_file_mode(secret) == (
        f"secret file {secret} has mode 0604, so group or others can access it; run chmod 600 {secret}"
    )
    assert check_secret_file_mode(tmp_path / "missing") is None


SECRET = "hvs.SECRETsecretSECRETsecret1234"
OLD_SECRET = "hvs.OLDoldOLDoldOLDoldOLDold5678"


@pytest.mark.parametrize(("key", "file", "what"), [
    ("vault.auth[0].role_id_file", "secrets/role_id", "role_id"),
    ("vault.auth[0].secret_id_file", "secrets/secret_id", "secret_id"),
    ("vault.auth[1].token_file", "secrets/token", "token"),
])
@pytest.mark.parametrize(("content", "problem"), [
    (f"{SECRET}\nold: {OLD_SECRET}\n", "has 2 lines; put only the {what} in it"),
    (f"# new one\n{SECRET}\n\n{OLD_SECRET}", "has 4 lines; put only the {what} in it"),
    (f"{SECRET} {OLD_SECRET}\n", "contains a space or tab; put only the {what} in it"),
    (f"\t{SECRET}", "contains a space or tab; put only the {what} in it"),
    (f"{SECRET}\x00{OLD_SECRET}", "contains a control character; put only the {what} in it"),
    (f"{SECRET}\rold", "contains a control character; put only the {what} in it"),
    (f"{SECRET}\u2019", "contains a non-ASCII character; a {what} is plain ASCII"),
    (f"\ufeff{SECRET}\n", "starts with a byte-order mark; save it as plain text without one"),
    ("", "is empty"),
    ("\n", "is empty"),
])
def test_a_credential_file_must_hold_just_the_credential(tmp_path: Path, key: str, file: str, what: str,
                                                        content: str, problem: str) -> None:
    config = _setup(tmp_path)
    _write(tmp_path / file, content, mode=0o600)
    problems = check_config(config)
    assert problems == [f"{key}: {what} file {file} {problem.format(what=what)}"]
    assert not any(part in problems[0] for part in ("SECRET", "OLDold", "new one"))
    with pytest.raises(ConfigError):
        load_config(config)


@pytest.mark.parametrize("content", ["s.abc\n", "6a1f0c2e-8d4b-4f1a-9c3e-2b7d5e8f1718\r\n", "tok", "x\n\n"])
def test_a_credential_with_a_line_ending_is_fine(tmp_path: Path, content: str) -> None:
    config = _setup(tmp_path)
    _write(tmp_path / "secrets/token", content, mode=0o600)
    assert check_config(config) == []
    assert credential_problem(content.encode(), "token") is None
    assert credential_text(content.encode()) == content.rstrip("\r\n")


def test_credential_problem_never_repeats_the_content() -> None:
    for content in (f"{SECRET}\n{OLD_SECRET}", f"{SECRET} x", f"{SECRET}\x07", f"{SECRET}é", "\xff\xfe"):
        problem = credential_problem(content.encode("utf-8", "surrogateescape"), "token")
        assert problem is not None and "SECRET" not in problem and "é" not in problem
    assert credential_problem(b"\xff\xfeabc", "token") == "contains a non-ASCII character; a token is plain ASCII"


@pytest.mark.parametrize(("key", "old", "pasted"), [
    ("vault.auth[0].secret_id_file", 'secret_id_file = "secrets/secret_id"', "6a1f0c2e-8d4b-4f1a-9c3e-2b7d5e8f1718"),
    ("vault.auth[0].role_id_file", 'role_id_file = "secrets/role_id"', "0b3c1f77-2a9e-4c5d-8e6f-71a2b3c4d5e6"),
    ("vault.auth[1].token_file", 'token_file = "secrets/token"', "CAESIJx9aZ3vQ0hY5xkP2mWnT8rLbD"),
    ("server.key", 'key = "certs/server.key"', "-----BEGIN PRIVATE KEY-----\\nMIGHAgEAMBMG\\n"),
])
def test_a_secret_pasted_in_place_of_a_path_is_not_repeated(tmp_path: Path, key: str, old: str,
                                                          pasted: str) -> None:
    name = old.split(" = ")[0]
    problem = _only_problem(tmp_path, _mutated(old, f'{name} = "{pasted}"'))
    assert problem == (f"{key}: no such file (the value is not shown: it may be a secret pasted in place of "
                       "a path; write a file name as ./NAME)")
    assert pasted[:8] not in problem and "MIGHAgEA" not in problem


def test_a_missing_secret_file_with_a_path_is_named(tmp_path: Path) -> None:
    text = _mutated('secret_id_file = "secrets/secret_id"', 'secret_id_file = "./gone"')
    assert _only_problem(tmp_path, text) == (
        f"vault.auth[0].secret_id_file: file ./gone does not exist (resolved to {tmp_path}/gone)"
    )
    # A bare name is shown as missing without repeating it; with ./ it names the file.
    text = _mutated('secret_id_file = "secrets/secret_id"', 'secret_id_file = "secret_id"')
    assert _only_problem(tmp_path, text).startswith("vault.auth[0].secret_id_file: no such file (the value")


# --- vault ------------------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1:8200", "ftp://vault", "https://", "http://h:99999"])
def test_bad_vault_address(tmp_path: Path, address: str) -> None:
    problem = _only_problem(tmp_path, _mutated('"http://127.0.0.1:8200"', f'"{address}"'))
    assert problem == (
        f"vault.address: '{address}' is not an http:// or https:// URL; "
        "use e.g. https://vault.example:8200"
    )


@pytest.mark.parametrize(("address", "host"), [
    ("http://vault.example:8200", "vault.example"), ("http://10.0.0.5:8200", "10.0.0.5"),
    ("http://[2001:db8::1]:8200", "2001:db8::1"), ("HTTP://vault:8200", "vault"),
])
def test_plaintext_vault_off_this_host_needs_an_explicit_opt_in(tmp_path: Path, address: str, host: str) -> None:
    problem = _only_problem(tmp_path, _mutated('"http://127.0.0.1:8200"', f'"{address}"'))
    assert problem == (
        f"vault.address: http:// sends the broker's Vault token and every token it mints unencrypted to {host}; "
        "use https://, or set allow_plaintext = true in [vault] if that network path is protected otherwise"
    )
    allowed = _mutated('"http://127.0.0.1:8200"', f'"{address}"\nallow_plaintext = true')
    config = load_config(_setup(tmp_path, allowed))
    assert config.vault.allow_plaintext is True and config.vault.address == address


@pytest.mark.parametrize("address", ["http://127.0.0.1:8200", "http://127.8.9.10:8200", "http://localhost:8200",
                                     "http://[::1]:8200", "https://vault.example:8200", "https://10.0.0.5"])
def test_loopback_or_https_vault_needs_no_opt_in(tmp_path: Path, address: str) -> None:
    config = load_config(_setup(tmp_path, _mutated('"http://127.0.0.1:8200"', f'"{address}"')))
    assert config.vault.allow_plaintext is False


def test_allow_plaintext_must_be_a_boolean(tmp_path: Path) -> None:
    text = _mutated('"http://127.0.0.1:8200"', '"http://vault:8200"\nallow_plaintext = "yes"')
    problems = _problems(tmp_path, text)
    assert problems[0] == "vault.allow_plaintext: expected true or false, got a string ('yes')"
    assert problems[1].startswith("vault.address: http:// sends the broker's Vault token")


def test_bad_vault_timeout(tmp_path: Path) -> None:
    assert _only_problem(tmp_path, _mutated('timeout = "5s"', 'timeout = "0s"')) == (
        "vault.timeout: must be more than 0"
    )


def test_unknown_auth_method(tmp_path: Path) -> None:
    problem = _only_problem(tmp_path, _mutated('method = "approle"', 'method = "ldap"'))
    assert problem == "vault.auth[0].method: 'ldap' is not supported; use token, approle or cert"


def test_token_auth_needs_exactly_one_source(tmp_path: Path) -> None:
    both = _mutated('token_file = "secrets/token"', 'token_file = "secrets/token"\ntoken_env = "T"')
    assert _only_problem(tmp_path, both) == (
        "vault.auth[1]: set only one of token_file or token_env, not both"
    )
    neither = _mutated('token_file = "secrets/token"\n', "")
    assert _only_problem(tmp_path, neither) == "vault.auth[1]: method token needs token_file or token_env"


def test_bad_token_env_name(tmp_path: Path) -> None:
    text = _mutated('token_file = "secrets/token"', 'token_env = "VAULT TOKEN"')
    assert _only_problem(tmp_path, text) == (
        "vault.auth[1].token_env: 'VAULT TOKEN' is not an environment variable name"
    )


def test_approle_requires_files(tmp_path: Path) -> None:
    text = _mutated('secret_id_file = "secrets/secret_id"\n', "")
    assert _only_problem(tmp_path, text) == "vault.auth[0].secret_id_file: required key is missing"


def test_key_of_another_auth_method(tmp_path: Path) -> None:
    text = _mutated('role_id_file = "secrets/role_id"',
                    'role_id_file = "secrets/role_id"\ntoken_file = "secrets/token"')
    assert _only_problem(tmp_path, text) == (
        "vault.auth[0].token_file: method approle does not use this key (it belongs to token)"
    )


def test_bad_mount(tmp_path: Path) -> None:
    text = _mutated('role_id_file = "secrets/role_id"',
                    'role_id_file = "secrets/role_id"\nmount = "auth/approle"')
    assert _only_problem(tmp_path, text) == (
        "vault.auth[0].mount: give the mount path without the auth/ prefix, like 'approle'"
    )


# --- literal tokens ---------------------------------------------------------------------------


def test_literal_token_key(tmp_path: Path) -> None:
    text = _mutated('token_file = "secrets/token"', f'token = "{TOKEN}"')
    problems = _problems(tmp_path, text)
    assert "vault.auth[1].token: literal tokens are not allowed in the config; " \
           "use token_file or token_env" in problems
    assert all(TOKEN not in p and TOKEN[4:] not in p for p in problems)


def test_literal_secret_id_and_role_id(tmp_path: Path) -> None:
    text = _mutated('role_id_file = "secrets/role_id"',
                    'role_id_file = "secrets/role_id"\nrole_id = "abc"\nsecret_id = "def"')
    assert _problems(tmp_path, text) == [
        "vault.auth[0].role_id: literal role IDs are not allowed in the config; use role_id_file",
        "vault.auth[0].secret_id: literal secret IDs are not allowed in the config; "
        "use secret_id_file",
    ]


def test_token_shaped_value_anywhere(tmp_path: Path) -> None:
    text = _mutated('token_file = "secrets/token"', f'token_env = "{TOKEN}"')
    text = _mutated('policies = ["deploy"]', f'policies = ["deploy", "s.{"a" * 24}"]', text)
    text = _mutated('ttl = "1h"', f'ttl = "{TOKEN}"', text)
    problems = _problems(tmp_path, text)
    expected = ("this value looks like a Vault token; literal tokens are not allowed in the "
                "config; use token_file or token_env")
    assert problems == [
        "vault.auth[1].token_env: this value looks like a Vault token, not a variable name; put the token in "
        "an environment variable and give the variable's name here",
        f"profiles.deploy.policies[1]: {expected}",
        f"profiles.deploy.ttl: {expected}",
    ]
    assert not any(TOKEN[4:] in p or "a" * 24 in p for p in problems)


@pytest.mark.parametrize(("key", "old"), [
    ("vault.auth[0].secret_id_file", 'secret_id_file = "secrets/secret_id"'),
    ("vault.auth[0].role_id_file", 'role_id_file = "secrets/role_id"'),
    ("vault.auth[1].token_file", 'token_file = "secrets/token"'),
])
def test_a_token_pasted_into_a_file_key_gets_advice_for_that_key(tmp_path: Path, key: str, old: str) -> None:
    name = old.split(" = ")[0]
    problem = _only_problem(tmp_path, _mutated(old, f'{name} = "{TOKEN}"'))
    assert problem == (f"{key}: this value looks like a Vault token, not a file name; put the credential in a "
                       "file of its own (mode 0600) and give that file's path here")
    assert TOKEN[4:] not in problem


def test_token_never_echoed_even_as_a_key(tmp_path: Path) -> None:
    problems = _problems(tmp_path, VALID + f'\n[profiles."{TOKEN}"]\nttl = "1h"\n')
    assert problems and not any(TOKEN[4:] in p for p in problems)


def test_profile_named_token_is_not_a_literal(tmp_path: Path) -> None:
    text = VALID + '\n[profiles.token]\ntoken_role = "r"\nttl = "1h"\nallow = ["cn:x"]\n'
    assert "token" in load_config(_setup(tmp_path, text)).profiles


# --- server -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("8443", "'8443' is not host:port; use host:port, like 127.0.0.1:8443, localhost:8443 or "
                 "[::1]:8443"),
        ("::1:8443", "'::1:8443' is not host:port; put IPv6 addresses in brackets, like [::1]:8443"),
        ("[nope]:8443", "'nope' in '[nope]:8443' is not an IPv6 address"),
        ("localhost:99999", "'localhost:99999' has port '99999'; use a number from 0 to 65535"),
        ("localhost:http", "'localhost:http' has port 'http'; use a number from 0 to 65535"),
    ],
)
def test_bad_listen(tmp_path: Path, listen: str, message: str) -> None:
    text = _mutated('listen = "127.0.0.1:9090"', f'listen = "{listen}"')
    assert _only_problem(tmp_path, text) == f"ops.listen: {message}"


def test_bad_ciphersuites(tmp_path: Path) -> None:
    line = 'tls13_ciphersuites = ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"]'
    bad = _only_problem(tmp_path, _mutated(line, 'tls13_ciphersuites = ["TLS_AES_256_GCM_SHA384", '
                                                 '"ECDHE-RSA-AES128-GCM-SHA256"]'))
    assert bad.startswith("server.tls13_ciphersuites[1]: 'ECDHE-RSA-AES128-GCM-SHA256' is not a "
                          "TLS 1.3 cipher suite; use TLS_AES_256_GCM_SHA384, ")
    empty = _only_problem(tmp_path, _mutated(line, "tls13_ciphersuites = []"))
    assert empty == "server.tls13_ciphersuites: must list at least one cipher suite"


def test_stdlib_engine_refuses_a_cipher_suite_list_it_cannot_enforce(tmp_path: Path) -> None:
    line = 'tls13_ciphersuites = ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"]'
    only_128 = 'tls13_ciphersuites = ["TLS_AES_128_GCM_SHA256"]'
    problem = _only_problem(tmp_path, _mutated(line, only_128 + '\ntls_engine = "stdlib"'))
    assert problem == (
        'server.tls13_ciphersuites: tls_engine = "stdlib" cannot enforce a TLS 1.3 cipher suite list '
        '(Python\'s ssl has no way to restrict them); use tls_engine = "openssl", or remove tls13_ciphersuites'
    )
    # The default list, written out or left out, is what the stdlib engine documents; the
    # default engine enforces any list.
    assert load_config(_setup(tmp_path, _mutated(line, line + '\ntls_engine = "stdlib"'))).server.tls_engine == "stdlib"
    assert load_config(_setup(tmp_path, _mutated(line, 'tls_engine = "stdlib"'))).server.tls_engine == "stdlib"
    assert load_config(_setup(tmp_path, _mutated(line, only_128))).server.tls13_ciphersuites == (
        "TLS_AES_128_GCM_SHA256",)


# --- profiles ---------------------------------------------------------------------------------


def test_bad_profile_name(tmp_path: Path) -> None:
    problem = _only_problem(tmp_path, _mutated("[profiles.deploy]", "[profiles.Deploy]"))
    assert problem.startswith("profiles.Deploy: profile name 'Deploy' is not allowed; use up to 63 ")


def test_bad_mode(tmp_path: Path) -> None:
    assert _only_problem(tmp_path, _mutated('mode = "shared"', 'mode = "perjob"')) == (
        "profiles.deploy.mode: 'perjob' is not supported; use shared or per-job"
    )


def test_bad_token_role(tmp_path: Path) -> None:
    problem = _only_problem(tmp_path, _mutated('token_role = "ci-deploy"', 'token_role = "a/b"'))
    assert problem.startswith("profiles.deploy.token_role: 'a/b' is not a token role name")
    assert _only_problem(tmp_path, _mutated('token_role = "ci-deploy"', 'token_role = ""')) == (
        "profiles.deploy.token_role: must not be empty"
    )


def test_grace_does_not_fit_after_jitter(tmp_path: Path) -> None:
    text = _mutated('grace = "15m"', 'grace = "15m"\nrotate_after = "44m"')
    assert _only_problem(tmp_path, text) == (
        "profiles.deploy.grace: 15m does not fit: rotation at up to 48m24s (rotate_after 44m + 10% "
        "jitter) plus grace 15m exceeds ttl 1h; lower grace or rotate_after, or raise ttl"
    )


def test_grace_with_no_room_for_default_rotation(tmp_path: Path) -> None:
    assert _only_problem(tmp_path, _mutated('grace = "15m"', 'grace = "59m30s"')) == (
        "profiles.deploy.grace: 59m30s does not fit in ttl 1h: ttl minus grace leaves 30s, and "
        "rotation needs more than the 1m safety margin; lower grace or raise ttl"
    )


def test_rotate_after_bounds(tmp_path: Path) -> None:
    text = _mutated('grace = "15m"', 'grace = "15m"\nrotate_after = "1h"')
    assert _only_problem(tmp_path, text) == "profiles.deploy.rotate_after: 1h must be less than ttl 1h"
    text = _mutated('grace = "15m"', 'grace = "15m"\nrotate_after = "0s"')
    assert _only_problem(tmp_path, text) == "profiles.deploy.rotate_after: must be more than 0"


def test_negative_grace_and_zero_ttl(tmp_path: Path) -> None:
    text = _mutated('grace = "15m"', 'grace = "-1m"')
    text = _mutated('ttl = "10m"', 'ttl = "0s"', text)
    assert _problems(tmp_path, text) == [
        "profiles.deploy.grace: '-1m' is negative; durations must be 0 or more",
        "profiles.jobs.ttl: must be more than 0",
    ]


def test_per_job_keys_on_shared_profile(tmp_path: Path) -> None:
    text = _mutated('alert_threshold = 2', 'alert_threshold = 2\nreuse_interval = "10s"\n'
                    'family_max_age = "1h"\nmax_families_per_client = 5')
    message = 'only per-job profiles use this; remove it or set mode = "per-job"'
    assert _problems(tmp_path, text) == [
        f"profiles.deploy.reuse_interval: {message}",
        f"profiles.deploy.family_max_age: {message}",
        f"profiles.deploy.max_families_per_client: {message}",
    ]


def test_shared_keys_on_a_per_job_profile(tmp_path: Path) -> None:
    text = _mutated('reuse_interval = "20s"', 'reuse_interval = "20s"\nrotate_after = "5m"\n'
                    'check_interval = "30s"\nalert_threshold = 3')
    message = ("only shared profiles use this: a per-job family's token is replaced when its job refreshes, "
               "not rotated or checked by the broker; remove it")
    assert _problems(tmp_path, text) == [
        f"profiles.jobs.rotate_after: {message}",
        f"profiles.jobs.check_interval: {message}",
        f"profiles.jobs.alert_threshold: {message}",
    ]


def test_a_per_job_grace_is_not_checked_against_a_rotation(tmp_path: Path) -> None:
    """Nothing rotates a per-job profile: a replaced token lives min(grace, what it has left)."""
    text = _mutated('grace = "1m"', 'grace = "9m30s"')
    assert load_config(_setup(tmp_path, text)).profiles["jobs"].grace == 570


@pytest.mark.parametrize(("value", "expected"), [
    ("0", "0 is too small; the minimum is 1"),
    ("100001", "100001 is too large; the maximum is 100000"),
    ('"10"', "expected an integer, got a string ('10')"),
    ("2.5", "expected an integer, got a number (2.5)"),
])
def test_max_families_per_client_range(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str,
                                       expected: str) -> None:
    config = _setup(tmp_path, _mutated('reuse_interval = "20s"', f'reuse_interval = "20s"\nmax_families_per_client = {value}'))
    assert _check_lines(config, capsys) == [f"profiles.jobs.max_families_per_client: {expected}"]
    limit = load_config(_setup(tmp_path, _mutated('reuse_interval = "20s"',
                                                  'reuse_interval = "20s"\nmax_families_per_client = 100000')))
    assert limit.profiles["jobs"].max_families_per_client == 100000


def test_reuse_interval_maximum(tmp_path: Path) -> None:
    text = _mutated('reuse_interval = "20s"', 'reuse_interval = "2m"')
    assert _only_problem(tmp_path, text) == "profiles.jobs.reuse_interval: 2m is more than the maximum 1m"


def test_check_interval_and_alert_threshold(tmp_path: Path) -> None:
    text = _mutated('check_interval = "60s"', 'check_interval = "0"')
    text = _mutated("alert_threshold = 2", "alert_threshold = 0", text)
    assert _problems(tmp_path, text) == [
        "profiles.deploy.check_interval: must be more than 0",
        "profiles.deploy.alert_threshold: 0 is too small; the minimum is 1",
    ]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("job-*", "'job-*' matches no identity; patterns start with cn:, uri: or dns:"),
        ("CN:job-*", "'CN:job-*' matches no identity; patterns start with cn:, uri: or dns:"),
        ("cn:", "'cn:' has nothing after 'cn:'; add a name or glob, like cn:job-*"),
    ],
)
def test_bad_allow_pattern(tmp_path: Path, pattern: str, message: str) -> None:
    text = _mutated('allow = ["uri:spiffe://ci.example/runner/*", "cn:job-*"]',
                    f'allow = ["{pattern}"]')
    assert _only_problem(tmp_path, text) == f"profiles.deploy.allow[0]: {message}"


def test_bad_admin_pattern(tmp_path: Path) -> None:
    assert _only_problem(tmp_path, _mutated('allow = ["cn:ops-*"]', 'allow = ["ops-*"]')) == (
        "admin.allow[0]: 'ops-*' matches no identity; patterns start with cn:, uri: or dns:"
    )


def test_empty_or_missing_allow(tmp_path: Path) -> None:
    text = _mutated('allow = ["uri:spiffe://ci.example/runner/*", "cn:job-*"]', "allow = []")
    assert _only_problem(tmp_path, text) == (
        "profiles.deploy.allow: the list is empty, so nobody could fetch this; add at least one pattern"
    )
    text = _mutated('allow = ["dns:*.runners.example"]\n', "")
    assert _only_problem(tmp_path, text) == "profiles.jobs.allow: required key is missing"


# --- everything at once -----------------------------------------------------------------------


def test_all_problems_reported_together(tmp_path: Path) -> None:
    text = _mutated('listen = "127.0.0.1:8443"', 'listen = "8443"')
    text = _mutated('timeout = "5s"', 'timeout = "soon"', text)
    text = _mutated('token_file = "secrets/token"', f'token = "{TOKEN}"', text)
    text = _mutated('ttl = "1h"', 'tll = "1h"', text)
    text = _mutated('allow = ["dns:*.runners.example"]', 'allow = ["runner"]', text)
    config = _setup(tmp_path, text)
    os.chmod(tmp_path / "certs/server.key", 0o644)
    problems = check_config(config)
    expected = [
        "vault.auth[1].token: literal tokens are not allowed",
        "server.listen: '8443' is not host:port",
        "server.key: secret file",
        "vault.timeout: 'soon' is not a duration",
        "vault.auth[1]: method token needs token_file or token_env",
        "profiles.deploy.ttl: required key is missing",
        "unknown key 'profiles.deploy.tll'; did you mean 'ttl'?",
        "profiles.jobs.allow[0]: 'runner' matches no identity",
    ]
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected):
        assert problem.startswith(start), (problem, start)
    assert not any(TOKEN[4:] in p for p in problems)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert caught.value.problems == problems


def test_broker_check_reports_the_new_checks_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    text = _mutated('"http://127.0.0.1:8200"', '"http://vault.example:8200"')
    text = _mutated('secret_id_file = "secrets/secret_id"', 'secret_id_file = "6a1f0c2e-8d4b-4f1a-9c3e-2b7d5e8f1718"',
                    text)
    text = _mutated('tls13_ciphersuites = ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"]',
                    'tls13_ciphersuites = ["TLS_CHACHA20_POLY1305_SHA256"]\ntls_engine = "stdlib"', text)
    config = _setup(tmp_path, text)
    _write(tmp_path / "secrets/token", f"{SECRET}\n{OLD_SECRET}\n", mode=0o600)
    assert broker_main(["check", "--config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "server.tls13_ciphersuites", "vault.address", "vault.auth[0].secret_id_file", "vault.auth[1].token_file"]
    assert all(line.startswith(f"{config}: ") for line in lines)
    assert "6a1f0c2e" not in err and "SECRET" not in err and "OLDold" not in err
    assert "token file secrets/token has 2 lines; put only the token in it" in lines[3]


# --- found by testers: each refused by `broker check` with exit 2 and one line --------------


def _check_lines(config: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """What `broker check` prints, each line without the config file prefix; it must exit 2."""
    assert broker_main(["check", "--config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    prefix = f"{config}: "
    assert all(line.startswith(prefix) for line in err.splitlines()), err
    return [line[len(prefix):] for line in err.splitlines()]


@pytest.mark.parametrize(("setting", "expected"), [
    ("rate_limit = nan", "server.rate_limit: nan is not a finite number; use a number from 0 to 100000"),
    ("rate_limit_burst = nan", "server.rate_limit_burst: nan is not a finite number; use a number from 1 to 1000000"),
    ("rate_limit = inf", "server.rate_limit: inf is not a finite number; use a number from 0 to 100000"),
    ("rate_limit_burst = -inf",
     "server.rate_limit_burst: -inf is not a finite number; use a number from 1 to 1000000"),
    ("rate_limit = 1e9", "server.rate_limit: 1e+09 is out of range; use a number from 0 to 100000"),
    ("max_body_bytes = 99999999999999999",
     "server.max_body_bytes: 99999999999999999 is too large; the maximum is 16777216"),
    ("handshake_timeout = inf", "server.handshake_timeout: inf is not a duration; use a number with a unit, "
                                "like 90s, 15m or 1h"),
    ("handshake_timeout = nan", "server.handshake_timeout: nan is not a duration; use a number with a unit, "
                                "like 90s, 15m or 1h"),
    ("handshake_timeout = 1e300",
     "server.handshake_timeout: 1e+300 is more than 366 days, the longest duration the broker accepts"),
    ('handshake_timeout = "99999999d"',
     "server.handshake_timeout: '99999999d' is more than 366 days, the longest duration the broker accepts"),
])
def test_numbers_must_be_finite_and_in_range(tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str,
                                             expected: str) -> None:
    config = _setup(tmp_path, _mutated('listen = "127.0.0.1:8443"', f'listen = "127.0.0.1:8443"\n{setting}'))
    assert _check_lines(config, capsys) == [expected]


def test_upper_bounds_are_accepted(tmp_path: Path) -> None:
    text = _mutated('listen = "127.0.0.1:8443"', 'listen = "127.0.0.1:8443"\nmax_body_bytes = 16777216\n'
                    'rate_limit = 100000\nrate_limit_burst = 1e6\nhandshake_timeout = "366d"')
    text = _mutated("alert_threshold = 2", "alert_threshold = 1000", text)
    server = load_config(_setup(tmp_path, text)).server
    assert (server.max_body_bytes, server.rate_limit, server.rate_limit_burst) == (16777216, 1e5, 1e6)
    assert _only_problem(tmp_path, _mutated("alert_threshold = 2", "alert_threshold = 1001")) == (
        "profiles.deploy.alert_threshold: 1001 is too large; the maximum is 1000"
    )


@pytest.mark.parametrize(("setting", "expected"), [
    ('reuse_interval = "20s"\nfamily_max_age = "1s"',
     "1s is not longer than reuse_interval 20s: the family would end while its job may still retry a refresh; "
     "raise family_max_age or lower reuse_interval"),
    ('reuse_interval = "20s"\nfamily_max_age = "20s"',
     "20s is not longer than reuse_interval 20s: the family would end while its job may still retry a refresh; "
     "raise family_max_age or lower reuse_interval"),
    ('reuse_interval = "0s"\nfamily_max_age = "500ms"',
     "500ms leaves no room for a token: a family must last at least 1s, the shortest token the broker mints"),
])
def test_family_max_age_must_leave_room_for_a_token(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    setting: str, expected: str) -> None:
    config = _setup(tmp_path, _mutated('reuse_interval = "20s"', setting))
    assert _check_lines(config, capsys) == [f"profiles.jobs.family_max_age: {expected}"]


def test_a_family_shorter_than_ttl_is_fine(tmp_path: Path) -> None:
    # Each token is cut to end with its family; ttl 10m does not make a 1m family wrong.
    config = load_config(_setup(tmp_path, _mutated('reuse_interval = "20s"',
                                                   'reuse_interval = "0s"\nfamily_max_age = "1s"')))
    assert config.profiles["jobs"].family_max_age == 1.0


@pytest.mark.parametrize("address", [
    "http://vaultuser:Hunter2pw@127.0.0.1:8200", "https://Hunter2pw@vault.example:8200",
    "http://vaultuser:Hunter2pw@vault.example:8200",  # not also the plaintext problem: one line
])
def test_vault_address_with_user_info_is_refused_unrepeated(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            address: str) -> None:
    config = _setup(tmp_path, _mutated('"http://127.0.0.1:8200"', f'"{address}"'))
    assert _check_lines(config, capsys) == [
        "vault.address: has a user name or password before '@' (not shown: it may be a secret); give the "
        "broker's Vault credential in [[vault.auth]], and only scheme://host:port here"
    ]


@pytest.mark.parametrize("address", [
    "http://127.0.0.1:8200/?token=Hunter2pw", "https://vault.example:8200#Hunter2pw",
    "https://vault.example:8200/v1?Hunter2pw",
])
def test_vault_address_with_query_or_fragment_is_refused_unrepeated(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], address: str) -> None:
    config = _setup(tmp_path, _mutated('"http://127.0.0.1:8200"', f'"{address}"'))
    assert _check_lines(config, capsys) == [
        "vault.address: has a query ('?…') or fragment ('#…') (not shown: it may hold a token); use only "
        "scheme://host:port, with a path if Vault sits under one"
    ]


def test_a_bad_vault_address_is_shown_without_user_info_or_query(tmp_path: Path) -> None:
    problem = _only_problem(tmp_path, _mutated('"http://127.0.0.1:8200"', '"ftp://u:Hunter2pw@vault/x?Hunter2pw"'))
    assert problem == ("vault.address: 'ftp://…@vault/x?…' is not an http:// or https:// URL; "
                       "use e.g. https://vault.example:8200")


@pytest.mark.parametrize(("url", "shown"), [
    ("https://vault.example:8200/v1", "https://vault.example:8200/v1"),
    ("https://user:Hunter2pw@host:1", "https://…@host:1"),
    ("https://user:Hunter2?pw@host", "https://…"),  # a "?" in a password, or an "@" in a query?
    ("https://host:1/?token=s.Part1@Part2pw", "https://…"),
    ("https://ci:Hunter2pw/x@host:1", "https://…@host:1"),  # a "/" in the password
    ("https://host/?token=Hunter2pw", "https://host/?…"),
    ("https://host#Hunter2pw?x", "https://host#…"),
    ("user:Hunter2pw@host", "…@host"),  # no scheme: everything before "@" may be user info
    ("https://[::1", "https://[::1"),
])
def test_url_without_secrets_cuts_by_text(url: str, shown: str) -> None:
    assert url_without_secrets(url) == shown


@pytest.mark.parametrize(("key", "file", "what"), [
    ("vault.auth[0].role_id_file", "secrets/role_id", "role_id"),
    ("vault.auth[0].secret_id_file", "secrets/secret_id", "secret_id"),
    ("vault.auth[1].token_file", "secrets/token", "token"),
])
@pytest.mark.parametrize("content", ['"Hunter2pw-6a1f0c2e"\n', "'Hunter2pw-6a1f0c2e'", '"Hunter2pw-6a1f0c2e'])
def test_a_quoted_credential_is_refused_unrepeated(tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str,
                                                   file: str, what: str, content: str) -> None:
    config = _setup(tmp_path)
    _write(tmp_path / file, content, mode=0o600)
    lines = _check_lines(config, capsys)
    assert lines == [f"{key}: {what} file {file} is wrapped in quotes; put only the {what} in it, without quotes"]
    assert credential_problem(content, what) is not None


def test_deeply_nested_toml_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "broker.toml"
    config.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    assert _check_lines(config, capsys) == ["invalid TOML: arrays or inline tables are nested too deeply"]


def test_deeply_dotted_keys_are_scanned_without_recursion(tmp_path: Path) -> None:
    # Five times the default recursion limit; tomllib's own parse time grows with the square of
    # the depth, so deeper only makes the suite slower (20,000 took 16 s).
    depth = 5 * sys.getrecursionlimit()
    text = VALID + "[deep]\n" + ".".join(["x"] * depth) + f' = "{TOKEN}"\n'
    problems = _problems(tmp_path, text)
    assert problems[0].startswith("…") and problems[0].endswith(".x.x: this value looks like a Vault token; "
                                                                 "literal tokens are not allowed in the config; "
                                                                 "use token_file or token_env")
    assert len(problems[0]) < 400 and TOKEN[4:] not in "".join(problems)
    assert problems[1:] == ["unknown key 'deep'"]


def test_grace_longer_than_ttl_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, _mutated('grace = "15m"', 'grace = "2h"'))
    assert _check_lines(config, capsys) == [
        "profiles.deploy.grace: 2h is not shorter than ttl 1h: the previous token would expire before its grace "
        "ends; lower grace or raise ttl"
    ]


def _with_real_certs(tmp_path: Path, pki: Pki) -> None:
    """`broker check` loads the listener's certificate, key and CA as serve does: real ones."""
    for name in ("server.pem", "server.key", "ca.pem"):
        shutil.copy2(pki.dir / name, tmp_path / "certs" / name)


def test_check_notes_a_token_env_unset_here_but_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    """`broker check` often runs where the service's environment is not: a note, exit 0."""
    config = _setup(tmp_path, _mutated('token_file = "secrets/token"', 'token_env = "BROKER_TEST_TOKEN"'))
    _with_real_certs(tmp_path, pki)
    monkeypatch.delenv("BROKER_TEST_TOKEN", raising=False)
    assert broker_main(["check", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{config}: ok\n"
    assert err == (f"{config}: note: vault.auth[1].token_env: BROKER_TEST_TOKEN is not set in this environment; "
                   "`broker serve` reads it from its own (e.g. systemd Environment= or EnvironmentFile=), so make "
                   "sure it is set there\n")
    monkeypatch.setenv("BROKER_TEST_TOKEN", "x" * 20)
    assert broker_main(["check", "--config", str(config)]) == 0
    assert capsys.readouterr() == (f"{config}: ok\n", "")


@pytest.mark.parametrize(("content", "problem"), [
    ("[server\n", "invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 8)"),
    (None, "config file does not exist"),
])
def test_file_problems_name_the_config_as_given(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch, content: str | None,
                                                problem: str) -> None:
    """Like every key's problem (`broker.toml: server.listen: ...`), not as an absolute path."""
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "broker.toml").write_text(content)
    assert broker_main(["check", "--config", "broker.toml"]) == 2
    assert capsys.readouterr() == ("", f"broker.toml: {problem}\n")


@pytest.mark.parametrize("engine", ["openssl", "stdlib"])
def test_check_refuses_what_serve_would_in_the_listener_tls_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  pki: Pki, engine: str) -> None:
    """An expired server certificate, a key for another certificate, a file that is no PEM:
    check used to say ok, and serve then refused to start (or, on SIGHUP, kept the old one)."""
    config = _setup(tmp_path, _mutated('tls13_ciphersuites = ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"]',
                                       f'tls_engine = "{engine}"'))
    _with_real_certs(tmp_path, pki)
    assert broker_main(["check", "--config", str(config)]) == 0
    capsys.readouterr()
    shutil.copy2(pki.dir / "job.key", tmp_path / "certs" / "server.key")
    assert _check_lines(config, capsys) == [
        f"server: server key {tmp_path / 'certs/server.key'} does not match the certificate in "
        f"{tmp_path / 'certs/server.pem'}"]


def test_the_two_listeners_on_one_address_are_refused(tmp_path: Path) -> None:
    text = _mutated('[ops]\nlisten = "127.0.0.1:9090"', '[ops]\nlisten = "127.0.0.1:8443"')
    assert _only_problem(tmp_path, text) == (
        "ops.listen: 127.0.0.1:8443 is server.listen too; give each listener its own port")


def test_a_vault_timeout_over_five_minutes_is_refused(tmp_path: Path) -> None:
    """A call that long is not coming back; waiting for it holds a worker thread and a rotation."""
    text = _mutated('timeout = "5s"', 'timeout = "10m"')
    assert _problems(tmp_path, text) == ["vault.timeout: 10m is more than the maximum 5m"]


@pytest.mark.parametrize("prefix", ["hvs", "hvb", "hvr", "s", "b", "r"])
def test_every_vault_token_shape_is_recognised_and_redacted(prefix: str) -> None:
    """Service, batch and recovery tokens, in Vault's current and legacy spellings."""
    from broker.config import looks_like_token, redact_tokens

    token = f"{prefix}.{'A1b2C3d4E5' * 3}"
    assert looks_like_token(token) and looks_like_token(f"  {token}\n")
    assert redact_tokens(f"error: {token} refused") == "error: <redacted token> refused"
    assert not looks_like_token(f"{prefix}.short") and not looks_like_token(f"x{token}")


def test_profile_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    text = _mutated('check_interval = "60s"\nalert_threshold = 2\n', "")
    text = _mutated('reuse_interval = "20s"\n', "", text)
    profiles = load_config(_setup(tmp_path, text)).profiles
    deploy, jobs = profiles["deploy"], profiles["jobs"]
    assert (deploy.alert_threshold, deploy.check_interval, deploy.grace) == (2, 60.0, 900.0)
    assert (jobs.reuse_interval, jobs.family_max_age, jobs.max_families_per_client) == (30.0, 86400.0, 100)
