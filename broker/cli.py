"""``broker`` command line (DESIGN §4). The only module that exits the process.

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error. Errors are one line on
stderr, never a traceback, and never contain a token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from broker.errors import BrokerError, CertError, ConfigError

if TYPE_CHECKING:
    from broker.client import BrokerClient
    from broker.config import Config

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# A POSIX shell variable name (str.isidentifier would also admit "é" or "ünïcode").
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Ctrl-C is how these are meant to stop; for every other command it cuts the work short.
LONG_RUNNING = frozenset({"serve", "dev"})


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error style: one line on stderr, exit 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        if message.endswith("expected one argument"):
            # argparse takes a value such as -5s for an option, so it never reaches our check.
            message += " (for a value that starts with '-', write OPTION=VALUE)"
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _profile_name(text: str) -> str:
    """A profile name as the config allows it: anything else cannot exist on any broker."""
    from broker.config import PROFILE_NAME

    if not PROFILE_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text[:70]!r} is not a profile name (up to 63 lowercase letters, "
                                         "digits, '_', '.' or '-', starting with a letter or digit)")
    return text


class _Version(argparse.Action):
    """``--version``, looked up only when asked: reading the installed metadata costs ~50 ms,
    which every ``broker get`` in every job would otherwise pay."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the installed version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("token-broker")
        except PackageNotFoundError:  # run from a source tree that was never installed
            installed = "unknown (not installed)"
        print(f"broker {installed}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="broker", description="mTLS sidecar token broker for CI runners")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the broker")
    serve.add_argument("--config", required=True, type=Path, help="TOML config file")

    dev = sub.add_parser("dev", help="OpenBao dev server + dev PKI + sample profile + broker, all local")
    dev.add_argument("--dir", type=Path, default=Path(".broker-dev"), help="where certs and config go")
    dev.add_argument("--port", type=int, default=8443, help="mTLS API port (default 8443; 0: any free port)")
    dev.add_argument("--ops-port", type=int, default=9090, help="ops port (default 9090; 0: any free port)")

    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("--config", required=True, type=Path)

    certs = sub.add_parser("certs", help="make a dev PKI").add_subparsers(dest="certs_command", required=True,
                                                                       metavar="ACTION")
    init = certs.add_parser("init", help="CA and server certificate")
    init.add_argument("--dir", type=Path, default=Path("certs"))
    init.add_argument("--host", action="append", dest="hosts", metavar="NAME",
                      help="server name or IP (repeatable; default localhost, 127.0.0.1, ::1)")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    client = certs.add_parser("client", help="a client certificate for a job or an operator")
    client.add_argument("name")
    client.add_argument("--dir", type=Path, default=Path("certs"))
    client.add_argument("--uri", action="append", default=[], help="SAN URI (repeatable)")
    client.add_argument("--days", type=int, default=365)
    client.add_argument("--force", action="store_true")
    crl = certs.add_parser("crl", help="revoke client certificates: write ca.crl for [server] client_crl")
    crl.add_argument("names", nargs="*", metavar="NAME",
                     help="client certificates to revoke: NAME.pem in --dir, or a path to a .pem (earlier ones "
                          "stay listed)")
    crl.add_argument("--dir", type=Path, default=Path("certs"))
    crl.add_argument("--days", type=int, default=30, help="until its nextUpdate (default 30): renew it before then")

    get = sub.add_parser("get", help="fetch a token (job side; env BROKER_URL/CERT/KEY/CA)")
    get.add_argument("profile", type=_profile_name)
    get.add_argument("--min-ttl", default=None, help="at least this much lifetime left, e.g. 10m")
    _output_args(get)
    get.add_argument("--retries", type=_non_negative, default=5, help="retries on 503, 429 and connection errors")
    get.add_argument("--refresh-file", type=Path,
                     help="per-job profiles: start a token family and keep its refresh token in this file (0600)")

    refresh = sub.add_parser("refresh", help="per-job: rotate the family in --refresh-file, print the new token")
    refresh.add_argument("--refresh-file", type=Path, required=True)
    release = sub.add_parser("release", help="per-job: the job is done; revoke the family in --refresh-file")
    release.add_argument("--refresh-file", type=Path, required=True)
    _output_args(refresh)
    for command in (refresh, release):
        command.add_argument("--retries", type=_non_negative, default=5)

    for action in ("rotate", "revoke"):
        admin = sub.add_parser(action, help=f"admin: {action} a profile's token now")
        admin.add_argument("profile", type=_profile_name)
        admin.add_argument("--retries", type=_non_negative, default=2)
    return p


def _output_args(command: argparse.ArgumentParser) -> None:
    command.add_argument("--format", choices=("raw", "json", "env"), default="raw")
    command.add_argument("--env-name", default="VAULT_TOKEN", help="variable name for --format env")
    command.add_argument("--output", type=Path, help="write to this file (0600) instead of stdout")


def _setup_logging() -> None:
    import logging  # here and below: imports only serve and dev need keep `broker get` quick to start

    level = os.environ.get("BROKER_LOG_LEVEL", "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        raise _Usage(f"BROKER_LOG_LEVEL {level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from broker.config import load_config
    from broker.service import build, install_uvloop, serve_until_signalled

    _setup_logging()
    broker = build(load_config(args.config))
    install_uvloop()
    asyncio.run(serve_until_signalled(broker))
    return EXIT_OK


def _exit_past_stuck_vault_calls(code: int) -> None:
    """Everything the broker keeps is written and closed by now; a Vault call that cannot be
    interrupted must not hold the process past its stop timeout."""
    import logging

    from broker.service import stuck_vault_calls

    stuck = stuck_vault_calls()
    if not stuck:
        return
    logging.getLogger("broker.service").warning(
        "shutdown_left_vault_calls threads=%d reason=a Vault call still running cannot be interrupted; exiting "
        "without waiting for it", len(stuck))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _dev(args: argparse.Namespace) -> int:
    from broker.devserver import run_dev

    _setup_logging()
    return run_dev(args.dir, args.port, args.ops_port)


def _check(args: argparse.Namespace) -> int:
    from broker.config import load_config

    try:
        config = load_config(args.config)
        _server_tls_files(config)
        _writable_places(config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(_in_file(args.config, problem), file=sys.stderr)
        return EXIT_USAGE
    for note in _unset_token_envs(config):
        print(_in_file(args.config, note), file=sys.stderr)
    print(f"{args.config}: ok")
    return EXIT_OK


def _server_tls_files(config: Config) -> None:
    """Load the listener's certificate, key and client CA as ``serve`` does, so that check
    refuses what a start would: an expired certificate, a key that does not match it..."""
    from broker.tlsengine import listener_context

    try:
        listener_context(config.server)
    except CertError as exc:
        raise ConfigError([f"server: {exc}"]) from None


def _writable_places(config: Config) -> None:
    """Where ``serve`` writes must be writable by whoever runs check (run it as the broker's
    user): else the start fails (audit, state) or every secret_id rotation does, quietly."""
    places = [("audit.path", config.audit.path, True), ("state.dir", config.state.dir, False)]
    places += [(f"vault.auth[{i}].secret_id_file", auth.secret_id_file.parent, False)
               for i, auth in enumerate(config.vault.auth)
               if auth.rotate_secret_id is not None and auth.secret_id_file is not None]
    problems = [f"{key}: {problem}" for key, path, is_file in places
                if (problem := _not_writable(Path(path), is_file)) is not None]
    if problems:
        raise ConfigError(problems)


def _not_writable(path: Path, is_file: bool) -> str | None:
    """Why this user cannot create or write ``path`` (a file, or a directory and files in it)."""
    if path.exists() and path.is_dir() == is_file:
        return f"{path} is a directory, not a file" if is_file else f"{path} exists and is not a directory"
    target = path if path.exists() else path.parent if is_file else path
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_file() and existing != path:
        return f"{existing} is a file, so {path} cannot be created"
    if not os.access(existing, os.W_OK | (0 if existing.is_file() else os.X_OK)):
        what = "cannot write" if existing == path else f"cannot create {path}: no write access to"
        return f"{what} {existing} as this user (uid {os.getuid()}); run broker check as the broker's user"
    return None


def _unset_token_envs(config: Config) -> list[str]:
    """A note for each ``token_env`` unset here. Not a problem: ``check`` often runs in another
    environment than the service; but when it is the same one, ``serve`` could not log in with it."""
    return [f"note: vault.auth[{i}].token_env: {auth.token_env} is not set in this environment; `broker serve` "
            "reads it from its own (e.g. systemd Environment= or EnvironmentFile=), so make sure it is set there"
            for i, auth in enumerate(config.vault.auth) if auth.token_env and not os.environ.get(auth.token_env)]


def _in_file(config: Path, problem: str) -> str:
    """``FILE: problem``, unless the problem already names the file (it does for file-level ones)."""
    named = (str(config), os.path.abspath(config))
    return problem if problem.startswith(named) else f"{config}: {problem}"


def _certs(args: argparse.Namespace) -> int:
    from broker import certs

    if args.certs_command == "init":
        hosts = args.hosts or list(certs.DEFAULT_HOSTS)
        written = certs.init_ca_and_server(args.dir, hosts, force=args.force)
        for path in written.values():
            print(path)
        return EXIT_OK
    if args.certs_command == "crl":
        path, listed = certs.revoke_clients(args.dir, args.names, days=args.days)
        print(path)
        print(f"{listed} certificate(s) listed, valid for {args.days} day(s); reload the broker (SIGHUP) to apply it",
              file=sys.stderr)
        return EXIT_OK
    cert, key = certs.issue_client(args.dir, args.name, uris=args.uri, days=args.days, force=args.force)
    print(cert)
    print(key)
    return EXIT_OK


def _client(retries: int) -> BrokerClient:
    from broker.client import BrokerClient, ClientConfig

    return BrokerClient(ClientConfig.from_env(os.environ, retries=retries))


def _render(body: dict[str, object], fmt: str, env_name: str) -> str:
    token = str(body["token"])
    if fmt == "json":
        return json.dumps(body) + "\n"
    if fmt == "env":
        return f"export {env_name}={shlex.quote(token)}\n"
    return token + "\n"


def _min_ttl(text: str | None) -> float | None:
    from broker.config import MAX_DURATION, MAX_DURATION_TEXT, parse_duration

    if text is None:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise _Usage(f"--min-ttl: {exc}") from None
    if not seconds <= MAX_DURATION:  # also inf and nan, from hundreds of digits
        raise _Usage(f"--min-ttl: {text[:20]!r} is more than {MAX_DURATION_TEXT}, more than any token lasts")
    return seconds


def _check_streams(args: argparse.Namespace) -> None:
    """Before anything is fetched: where the token goes must be open (``>&-`` closes stdout),
    and under GitHub Actions stderr must take the ::add-mask:: line, which on stdout would
    end up in ``$(broker get …)`` beside the token."""
    if args.output is None and sys.stdout is None:
        raise _Usage("stdout is closed; use --output FILE")
    if os.environ.get("GITHUB_ACTIONS") == "true" and sys.stderr is None:
        raise _Usage("stderr is closed, so the ::add-mask:: line cannot be printed before the token")


def _get(args: argparse.Namespace) -> int:
    min_ttl = _min_ttl(args.min_ttl)
    _check_env_name(args.env_name)
    _check_streams(args)
    # Checked before the request: a token fetched and then not delivered is still audited as
    # served, and on a per-job profile it starts a family nobody can refresh or release.
    if args.output is not None:
        _check_writable(args.output, OUTPUT)
    if args.refresh_file is not None:
        if min_ttl:
            raise _Usage("--min-ttl is for shared profiles; --refresh-file starts a per-job family, whose tokens each "
                         "last the profile's ttl (run broker refresh before one runs out)")
        _check_distinct(args.output, args.refresh_file)
        _check_new_refresh_file(args.refresh_file)
    client = _client(args.retries)
    if args.refresh_file is not None:
        body = client.start_family(args.profile)
        _keep_or_release(client, args.refresh_file, body)
    else:
        body = client.get_token(args.profile, min_ttl)
    return _emit(body, args)


def _check_env_name(name: str) -> None:
    if not ENV_NAME.fullmatch(name):
        raise _Usage(f"--env-name {name!r} is not a shell variable name (letters, digits, _)")


def _emit(body: dict[str, object], args: argparse.Namespace) -> int:
    """Print (or write to --output) the token in the asked format; never the refresh token."""
    from broker.client import write_secret_file

    body = {k: v for k, v in body.items() if k != "refresh_token"}
    if os.environ.get("GITHUB_ACTIONS") == "true":
        # On stderr: the runner reads workflow commands from both streams (actions/runner,
        # ScriptHandler.cs), and stdout may be $(...) or a file that must hold the token alone.
        print(f"::add-mask::{body['token']}", file=sys.stderr, flush=True)
    text = _render(body, args.format, args.env_name)
    if args.output:
        try:
            write_secret_file(args.output, text)
        except OSError as exc:
            raise _Failure(f"cannot write {args.output}: {exc.strerror or exc}") from None
        print(f"wrote {args.format} token for {body.get('profile')} (generation {body.get('generation')}, "
              f"expires {body.get('expires_at')}) to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


REFRESH_FILE_KEYS = ("profile", "family", "generation", "refresh_token", "refresh_expires_at")


def _keep_refresh_token(path: Path, body: dict[str, object]) -> None:
    from broker.client import write_secret_file

    try:
        write_secret_file(path, json.dumps({k: body.get(k) for k in REFRESH_FILE_KEYS}) + "\n")
    except OSError as exc:
        raise _Failure(f"cannot write the refresh file {path}: {exc.strerror or exc}") from None


OUTPUT = "the --output file"
REFRESH_FILE = "the refresh file"
STDOUT_HINT = " (to print the token, leave out --output)"


def _check_distinct(output: Path | None, refresh_file: Path) -> None:
    """One file cannot hold both: the token written last would make the refresh token, and so
    the family, unreachable (it could be neither refreshed nor released)."""
    if output is not None and os.path.realpath(output) == os.path.realpath(refresh_file):
        raise _Usage(f"--output and --refresh-file are the same file ({output}); the refresh token needs a file "
                     "of its own")


def _check_writable(path: Path, what: str) -> os.stat_result | None:
    """Before anything is fetched: ``path`` can take the atomic write (a temp file beside it,
    then a rename), or a usage error naming ``what`` says why not. Its stat if it exists."""
    import tempfile

    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise _Usage(f"cannot use {path} as {what}: {exc.strerror or exc}") from None
    if info is not None and stat.S_ISLNK(info.st_mode):
        # The atomic write renames a new file over the path: it would replace the link (as root,
        # /dev/stdout for everything after this command), not write through it.
        raise _Usage(f"{what} {path} is a symbolic link, which the write would replace rather than write "
                     f"through; give the path of a regular file{STDOUT_HINT if what == OUTPUT else ''}")
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise _Usage(f"{what} {path} exists and is not a regular file; pick another path")
    if not path.parent.is_dir():
        raise _Usage(f"cannot write {what} {path}: directory {path.parent} does not exist")
    try:  # the same kind of write the real one does
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass
    except OSError as exc:
        raise _Usage(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    return info


def _check_new_refresh_file(path: Path) -> None:
    """Before a family is started: a refresh file that cannot be written would leave a family
    nobody can release, and overwriting one would lose an earlier family's refresh token."""
    info = _check_writable(path, REFRESH_FILE)
    if info is not None and info.st_size > 0:
        raise _Usage(f"the refresh file {path} is not empty: it may hold an earlier family's refresh token; "
                     f"run broker release --refresh-file {shlex.quote(str(path))} first, or pick another file")


def _keep_or_release(client: BrokerClient, path: Path, body: dict[str, object]) -> None:
    """Keep the new family's refresh token in ``path``; if that fails, end the family now
    rather than leave a live Vault token that nobody can refresh or release."""
    try:
        _keep_refresh_token(path, body)
    except _Failure as failure:
        from broker.client import ClientError

        try:
            client.release(str(body.get("family")))
            outcome = "released the family just started"
        except ClientError as exc:
            outcome = f"could not release the family just started ({exc}); it ends at the profile's family_max_age"
        raise _Failure(f"{failure}; {outcome}") from None


REFRESH_FILE_LIMIT = 16 * 1024  # what broker get writes is a few hundred bytes


def _read_refresh_file(path: Path) -> dict[str, object]:
    not_ours = f"{path} is not a refresh file written by broker get --refresh-file"
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise _Usage(f"cannot read the refresh file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _Usage(f"the refresh file {path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        try:
            raw = f.read(REFRESH_FILE_LIMIT + 1)
        except OSError as exc:
            raise _Usage(f"cannot read the refresh file {path}: {exc.strerror or exc}") from None
    if len(raw) > REFRESH_FILE_LIMIT:
        raise _Usage(f"{not_ours} (larger than {REFRESH_FILE_LIMIT} bytes)")
    try:
        data = json.loads(raw)
    except ValueError:
        raise _Usage(not_ours) from None
    if not isinstance(data, dict) or not isinstance(data.get("refresh_token"), str) or "family" not in data:
        raise _Usage(not_ours)
    return data


def _refresh(args: argparse.Namespace) -> int:
    _check_env_name(args.env_name)
    _check_streams(args)
    # Before the refresh spends the old refresh token: the new one and the token must land.
    if args.output is not None:
        _check_writable(args.output, OUTPUT)
    _check_distinct(args.output, args.refresh_file)
    _check_writable(args.refresh_file, REFRESH_FILE)
    kept = _read_refresh_file(args.refresh_file)
    body = _client(args.retries).refresh(str(kept["refresh_token"]))
    try:
        _keep_refresh_token(args.refresh_file, body)
    except _Failure as failure:
        # The old file is intact (the write is atomic) and still names the family.
        raise _Failure(f"{failure}; the new refresh token is lost, so end the family with broker release "
                       f"--refresh-file {shlex.quote(str(args.refresh_file))}") from None
    return _emit(body, args)


def _release(args: argparse.Namespace) -> int:
    from broker.client import FamilyGone

    kept = _read_refresh_file(args.refresh_file)
    try:
        body = _client(args.retries).release(str(kept["family"]))
    except FamilyGone as gone:
        raise _Failure(f"{gone}; {_set_aside(args.refresh_file)}") from None
    args.refresh_file.unlink(missing_ok=True)
    if body is None:
        print(f"broker release: family {kept['family']} is already gone (ended by an earlier attempt whose "
              f"answer was lost); removed {args.refresh_file}", file=sys.stderr)
        return EXIT_OK
    print(json.dumps(body))
    if body.get("revoked") is False:
        print(f"broker: the family is ended, but Vault has not yet confirmed revoking "
              f"{body.get('pending_revocations')} of its tokens; the broker keeps retrying", file=sys.stderr)
    return EXIT_OK


def _set_aside(path: Path) -> str:
    """The broker knows no live family of this file for this certificate: it has ended (expired,
    revoked after a reuse, by an admin, with its profile), or another certificate started it
    (a renewed one, another job's). The file moves aside rather than going: in the second case
    it is the only way to end that family; and the path is free for the job's next family."""
    aside = path.with_name(path.name + ".ended")
    try:
        os.replace(path, aside)
    except OSError as exc:
        return f"the refresh file {path} stays ({exc.strerror or exc})"
    return (f"the family has ended, or this is not the certificate that started it; moved the refresh file to "
            f"{aside}")


def _admin(args: argparse.Namespace) -> int:
    body = _client(args.retries).admin(args.profile, args.command)
    print(json.dumps(body))
    return EXIT_OK


class _Usage(BrokerError):
    pass


class _Failure(BrokerError):
    pass


COMMANDS = {"serve": _serve, "dev": _dev, "check": _check, "certs": _certs, "get": _get,
            "refresh": _refresh, "release": _release,
            "rotate": _admin, "revoke": _admin}


def _report(command: str, exc: BaseException) -> int:
    """Print one line per problem of an expected failure; the exit code it calls for."""
    if sys.stderr is None:  # closed (2>&-): print() would fall back to stdout, which may be $(...)
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this short process
    prefix = f"broker {command}"
    if isinstance(exc, ConfigError):
        for problem in exc.problems:
            print(f"{prefix}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{prefix}: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{prefix}: {exc}", file=sys.stderr)
    if isinstance(exc, (_Usage, CertError)):
        return EXIT_USAGE
    return int(getattr(exc, "exit_code", EXIT_FAILURE))


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    code = _run(args)
    if args.command == "serve":
        _exit_past_stuck_vault_calls(code)  # however serve ended: a clean stop or a failure
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if args.command in LONG_RUNNING:
            return EXIT_OK
        print(f"broker {args.command}: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except (BrokerError, OSError) as exc:
        return _report(args.command, exc)
    except BaseExceptionGroup as group:
        # serve/dev run in a TaskGroup, which wraps a start-up failure (port taken...) in a group.
        leaves = _leaves(group)
        if not all(isinstance(e, (BrokerError, OSError)) for e in leaves):
            raise  # a bug: keep the traceback
        return max(_report(args.command, e) for e in leaves)
