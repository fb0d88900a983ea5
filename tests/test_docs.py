"""The docs against the code: the README's configuration reference names every key the config
reader accepts (derived from the config dataclasses), and docs/job-authors.md and
docs/operators.md show only commands, flags, error messages, alerts and files that exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from broker import config as config_module
from broker.cli import main
from broker.config import Config, check_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = {name: ROOT / "docs" / name for name in ("job-authors.md", "operators.md")}


# --- config keys from the dataclasses -------------------------------------------------------

def _dataclass_in(hint: object) -> type | None:
    """The dataclass a field holds: itself, or inside tuple[...]/dict[str, ...]/X | None."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


def accepted_keys() -> dict[str, set[str]]:
    """{TOML table: keys} as the reader takes them, derived from ``Config``'s dataclasses.

    A dataclass field holding another dataclass is a sub-table (``profiles.*`` for a dict of
    them, where the field ``name`` is the table's name); ``host`` + ``port`` are read from
    ``listen``; ``Config.source`` is where the file was, not a key.
    """
    tables: dict[str, set[str]] = {}

    def walk(cls: type, table: str) -> None:
        keys = tables.setdefault(table, set())
        hints = typing.get_type_hints(cls, vars(config_module))
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            inner = _dataclass_in(hint)
            if inner is not None:
                is_map = typing.get_origin(hint) is dict
                walk(inner, f"{table}.{f.name}".lstrip(".") + (".*" if is_map else ""))
            elif f.name in ("host", "port"):
                keys.add("listen")
            elif not (f.name == "name" and table.endswith(".*")):
                keys.add(f.name)

    walk(Config, "")
    tables[""].discard("source")
    assert not tables.pop(""), "Config holds only sections"
    return tables


def test_accepted_keys_look_right() -> None:
    keys = accepted_keys()
    assert set(keys) == {"server", "ops", "audit", "state", "vault", "vault.auth", "admin", "profiles.*"}
    assert {"listen", "cert", "key", "client_ca"} <= keys["server"] and "host" not in keys["server"]
    assert keys["ops"] == {"listen"}
    assert {"token_role", "ttl", "grace", "allow", "mode"} <= keys["profiles.*"] and "name" not in keys["profiles.*"]
    assert {"method", "role_id_file", "secret_id_file", "token_file", "token_env"} <= keys["vault.auth"]


def test_config_reader_accepts_every_derived_key(tmp_path: Path) -> None:
    """Cross-check of the derivation: a file with every key gets no "unknown key" problem."""
    keys = accepted_keys()
    lines: list[str] = []
    for table in ("server", "ops", "audit", "state", "vault", "admin"):
        lines += [f"[{table}]", *(f'{key} = "x"' for key in sorted(keys[table])), ""]
    for method in ("token", "approle", "cert"):  # each method rejects the others' keys as theirs, not unknown
        lines += ["[[vault.auth]]", f'method = "{method}"',
                  *(f'{key} = "x"' for key in sorted(keys["vault.auth"] - {"method"})), ""]
    for mode in ("shared", "per-job"):
        lines += [f"[profiles.p-{mode}]", f'mode = "{mode}"',
                  *(f'{key} = "x"' for key in sorted(keys["profiles.*"] - {"mode"})), ""]
    path = tmp_path / "broker.toml"
    path.write_text("\n".join(lines))
    problems = check_config(path)
    assert problems, "the dummy values must be reported, so the file was really read"
    assert not [p for p in problems if "unknown key" in p]


def readme_reference() -> dict[str, str]:
    """{table: its text} from the ```toml block under "## Configuration reference"."""
    text = README.read_text()
    section = text.split("## Configuration reference", 1)[1]
    block = re.search(r"```toml\n(.*?)```", section, re.DOTALL)
    assert block, "a ```toml block under ## Configuration reference"
    tables: dict[str, str] = {}
    current = ""
    for line in block[1].splitlines():
        header = re.match(r"\s*#?\s*\[\[?([\w.-]+)\]\]?", line)
        if header:
            name = header[1]
            current = "profiles.*" if name.startswith("profiles.") else name
            continue
        tables[current] = tables.get(current, "") + line + "\n"
    return tables


def readme_gaps() -> tuple[set[str], set[str]]:
    """(keys the reader takes that the README omits, keys the README shows that do not exist)."""
    documented = readme_reference()
    missing, unknown = set(), set()
    for table, keys in accepted_keys().items():
        text = documented.get(table, "")
        missing |= {f"{table}.{key}" for key in keys if not re.search(rf"\b{key}\s*=", text)}
        shown = set(re.findall(r"(?m)^\s*#?\s*(\w+)\s*=", text))
        unknown |= {f"{table}.{key}" for key in shown - keys}
    return missing, unknown


# The README lags the code here (secret_id rotation is new); the lead updates README.
KNOWN_README_GAPS: set[str] = set()


def test_readme_config_reference_shows_only_real_keys() -> None:
    missing, unknown = readme_gaps()
    assert not unknown, f"README documents keys the config reader rejects: {sorted(unknown)}"
    assert missing <= KNOWN_README_GAPS, f"README's configuration reference misses {sorted(missing)}"


def test_readme_config_reference_mentions_every_accepted_key() -> None:
    missing, _ = readme_gaps()
    assert not missing, f"README's configuration reference misses {sorted(missing)}"


# --- docs/*.md against the CLI ----------------------------------------------------------------

SUBCOMMANDS = ("certs", "certs init", "certs client", "certs crl", "serve", "dev", "check", "get", "refresh", "release",
               "rotate", "revoke")


def cli_help(subcommand: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main([*subcommand.split(), "--help"])
    assert exit_info.value.code == 0
    return out.getvalue()


def code_in(markdown: str) -> Iterator[str]:
    """Lines of fenced code blocks, and inline code spans."""
    for block in re.findall(r"```[\w-]*\n(.*?)```", markdown, re.DOTALL):
        yield from block.splitlines()
    without_blocks = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    yield from re.findall(r"`([^`\n]+)`", without_blocks)


def broker_commands(markdown: str) -> Iterator[tuple[str, list[str]]]:
    """(subcommand, flags) for every ``broker ...`` command line in the code of a doc."""
    for line in code_in(markdown):
        # Not after "the "/"a ": that is prose quoted in code ("the broker at … closed ...").
        for match in re.finditer(r"(?<![\w/.-])(?<!the )(?<!a )broker ((?:certs )?[a-z]+)([^|;&)`\n]*)", line):
            words, rest = match[1], match[2]
            if words == "answered":  # "broker answered 403 ..." is a message, not a command
                continue
            yield words, re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest)


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_docs_show_only_real_commands_and_flags(doc: str) -> None:
    helps = {sub: cli_help(sub) for sub in SUBCOMMANDS}
    seen = set()
    for sub, flags in broker_commands(DOCS[doc].read_text()):
        assert sub in helps, f"{doc}: `broker {sub}` is not a command"
        seen.add(sub)
        for flag in flags:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}\b", helps[sub]), f"{doc}: broker {sub} has no {flag}"
    assert seen, f"{doc} shows no broker command"


def test_job_author_doc_covers_every_ci_system_and_the_refresh_flow() -> None:
    text = DOCS["job-authors.md"].read_text()
    for needle in ("## GitHub Actions", "## GitLab CI", "## Jenkins", "## Zero to token in a shell",
                   "--refresh-file", "broker refresh", "broker release", "## Troubleshooting",
                   "BROKER_URL", "BROKER_CERT", "BROKER_KEY", "BROKER_CA", "https://localhost:8443"):
        assert needle in text, needle


def _source() -> str:
    """All of broker/'s Python, with implicitly concatenated string literals joined."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "broker").rglob("*.py")))
    return re.sub(r"\"\s*\n\s*f?\"", "", text)


def troubleshooting_rows() -> list[tuple[str, str]]:
    section = DOCS["job-authors.md"].read_text().split("## Troubleshooting", 1)[1]
    rows = re.findall(r"^\| `([^`]+)`[^|]*\| (\d) \|", section, re.MULTILINE)
    assert len(rows) >= 20
    return rows


def test_troubleshooting_messages_are_the_clients_real_messages() -> None:
    """Every message in the table is made of text the code really prints (``…`` = what varies)."""
    source = _source()
    for message, code in troubleshooting_rows():
        answered = re.match(r"broker answered (\d{3}) (\w+): ?", message)
        if answered:
            assert f'"{answered[2]}"' in source, f"no error code {answered[2]} in the code"
            message = message[answered.end():]
        pieces = re.split(r"…|;|\bBROKER_[A-Z]+\b", message)
        checked = [p.strip(" ().,:") for p in pieces if len(p.strip(" ().,:")) >= 12]
        for piece in checked:
            assert piece in source, f"troubleshooting says {piece!r}, which the code never prints"
        assert checked or answered, f"nothing checkable in {message!r}"
        assert code in ("1", "2")


def test_docs_link_to_files_that_exist() -> None:
    for name, path in DOCS.items():
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target:
                continue
            assert (path.parent / target).resolve().exists(), f"{name} links to missing {target}"


def test_operator_doc_explains_every_alert() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"]
    text = DOCS["operators.md"].read_text()
    for group in rules:
        for rule in group["rules"]:
            assert f"`{rule['alert']}`" in text, f"operators.md does not explain {rule['alert']}"


def test_operator_doc_covers_install_certs_vault_metrics_audit_incident_upgrade() -> None:
    text = DOCS["operators.md"].read_text()
    for needle in ("### pip", "### systemd", "### Container", "SIGHUP", "kill -HUP", "## Vault / OpenBao setup",
                   "auth/token/roles/", "orphan=true", "alerts.yml", "broker-dashboard.json", "## Audit log",
                   "token_fp", "broker revoke", "/v1/tokens/deploy/revoke", "## Upgrades and the state directory",
                   "revocations.json", "families.json"):
        assert needle in text, needle


def test_module_types_are_what_the_derivation_expects() -> None:
    """``accepted_keys`` resolves string annotations; a new annotation style should fail loudly here."""
    hints = typing.get_type_hints(Config, vars(config_module))
    assert typing.get_origin(hints["profiles"]) is dict
    assert isinstance(hints["source"], types.UnionType)
