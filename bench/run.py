"""Side-by-side benchmark: the broker against ``bao proxy`` (its closest alternative), in one run.

    python -m bench.run            # about 3 minutes; bench/results.md, bench/latency.png
    python -m bench.run --quick    # a few seconds per measurement

What it starts, all on loopback: a real OpenBao dev server, a dev PKI (ECDSA P-256), the broker
(``broker serve --config …``) and ``bao proxy`` with an mTLS listener and its lease cache, the
two serving the same client certificate a cached token per request. Servers are pinned to one
core, the load generator (``bench/loadgen.py``, its own process) to another. Server CPU per
fetch is the server process's utime+stime from ``/proc/<pid>/stat`` across the measured window
divided by the fetches completed in it. See bench/README.md for what every number means.

Every child process is stopped on exit, Ctrl-C, SIGTERM, failure, or when the whole run
exceeds its time budget (``--timeout``).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import ctypes
import datetime as dt
import http.client
import json
import math
import os
import platform
import resource
import select
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import certs  # noqa: E402
from broker.devserver import (  # noqa: E402
    AppRoleFiles,
    OpenBaoDevServer,
    bao_binary,
    free_port,
    setup_approle,
    setup_token_role,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOADGEN = HERE / "loadgen.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")

BROKER_ROLE = "bench"  # the broker's token role: orphan, renewable=false (as in production)
PROXY_ROLE = "bench-proxy"  # the proxy's: orphan, renewable=true (its lease cache skips non-renewable)
POLICY = "bench"
PROXY_BODY = json.dumps({"ttl": "1h"})  # every fetch sends the same request: the proxy's cache key

# Row keys, in table order: the smoke test checks the table has every one of them.
ROWS = (
    "cpu_keepalive", "cpu_fresh", "rate_keepalive", "rate_fresh", "p50_keepalive", "p99_keepalive",
    "p50_fresh", "p99_fresh", "rss_after_load", "rss_idle_conns", "ready",
    "vault_per_1000", "vault_per_1000_hourly", "vault_per_rotation", "p99_rotation", "p99_quiet",
    "p99_rotation_ratio",
)

CHECK_INTERVAL = 60.0  # the broker profile's check_interval (broker.toml below): one lookup per interval


class BenchError(Exception):
    """A setup or measurement step failed; the message says which and why."""


# --- settings ------------------------------------------------------------------------------

@dataclass
class Settings:
    seconds: float
    warmup: float
    connections: int
    fresh_concurrency: int
    idle_connections: int
    rotation_seconds: float
    rotation_ttl: float
    rotation_after: float
    rotation_grace: float
    rotation_rate: float
    rotation_connections: int
    proxy_log_level: str
    tls_engine: str | None
    output_dir: Path
    plot: bool
    keep: bool
    timeout: float
    json_path: Path | None
    quick: bool
    repeat: int

    def budget(self) -> float:
        per_run = self.seconds + self.warmup + 30
        return 4 * self.repeat * per_run + self.rotation_seconds + self.warmup + 40 + 2 * 60 + 90


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="short measurements (3 s each, rotation run 8 s): a smoke run, noisier numbers")
    p.add_argument("--seconds", type=float, help="length of each measured load run (default 10, quick 3)")
    p.add_argument("--warmup", type=float, help="unmeasured warm-up before each run (default 1, quick 0.5)")
    p.add_argument("--repeat", type=int, help="side-by-side load runs per server and mode, alternating "
                                            "broker and proxy; the table shows each one's median (default 3, quick 1)")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections (default 32)")
    p.add_argument("--fresh-concurrency", type=int, default=8,
                   help="concurrent workers in the fresh-connection run (each: handshake, fetch, close; default 8)")
    p.add_argument("--idle-connections", type=int, default=1000, help="idle TLS connections for the RSS row (default 1000)")
    p.add_argument("--rotation-seconds", type=float, help="rotation run length (default 20, quick 8)")
    p.add_argument("--rotation-ttl", type=float, help="rotation run: profile ttl, seconds (default 12, quick 8)")
    p.add_argument("--rotation-after", type=float, help="rotation run: rotate_after, seconds (default 3, quick 2)")
    p.add_argument("--rotation-grace", type=float, help="rotation run: grace, seconds (default 5, quick 3)")
    p.add_argument("--rotation-rate", type=float, default=500.0, help="rotation run: paced fetches per second (default 500)")
    p.add_argument("--rotation-connections", type=int, default=8, help="rotation run: keep-alive connections (default 8)")
    p.add_argument("--proxy-log-level", default="warn", help="bao proxy -log-level (default warn; info logs every request)")
    p.add_argument("--tls-engine", help="the broker's [server] tls_engine (default: the broker's own default)")
    p.add_argument("--output-dir", type=Path, default=HERE, help="where results.md and latency.png go (default bench/)")
    p.add_argument("--json", type=Path, dest="json_path", help="also write every raw number to this JSON file")
    p.add_argument("--no-plot", action="store_true", help="skip latency.png even if matplotlib is installed")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, audit files)")
    p.add_argument("--timeout", type=float, help="hard limit for the whole run, seconds (default: computed)")
    a = p.parse_args(argv)
    q = a.quick
    s = Settings(
        seconds=a.seconds if a.seconds is not None else (3.0 if q else 10.0),
        warmup=a.warmup if a.warmup is not None else (0.5 if q else 1.0),
        connections=a.connections, fresh_concurrency=a.fresh_concurrency, idle_connections=a.idle_connections,
        rotation_seconds=a.rotation_seconds if a.rotation_seconds is not None else (8.0 if q else 20.0),
        rotation_ttl=a.rotation_ttl if a.rotation_ttl is not None else (8.0 if q else 12.0),
        rotation_after=a.rotation_after if a.rotation_after is not None else (2.0 if q else 3.0),
        rotation_grace=a.rotation_grace if a.rotation_grace is not None else (3.0 if q else 5.0),
        rotation_rate=a.rotation_rate, rotation_connections=a.rotation_connections,
        proxy_log_level=a.proxy_log_level, tls_engine=a.tls_engine, output_dir=a.output_dir,
        plot=not a.no_plot, keep=a.keep,
        timeout=0.0, json_path=a.json_path, quick=q,
        repeat=a.repeat if a.repeat is not None else (1 if q else 3),
    )
    s.timeout = a.timeout if a.timeout is not None else s.budget()
    if min(s.seconds, s.rotation_seconds) <= 0 or s.warmup < 0:
        p.error("durations must be positive")
    if min(s.connections, s.fresh_concurrency, s.idle_connections, s.rotation_connections, s.repeat) < 1:
        p.error("connection counts must be at least 1")
    return s


# --- processes -----------------------------------------------------------------------------

def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the child gets SIGTERM if the benchmark is killed outright (-9)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


@contextlib.contextmanager
def affinity(cpus: set[int]) -> Iterator[None]:
    """Children started inside inherit ``cpus`` (for Popen calls we do not make ourselves)."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


class Children:
    """Every process this run started, stopped in reverse order, whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, name: str, argv: list[str], *, cpus: set[int], env: dict[str, str] | None = None,
              pipes: bool = False) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")

        def pre() -> None:
            os.sched_setaffinity(0, cpus)
            _die_with_parent()

        try:
            proc = subprocess.Popen(
                argv, env=env, cwd=self.workdir, preexec_fn=pre, start_new_session=True,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else log, stderr=log, bufsize=0,
            )
        finally:
            log.close()
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        while self.procs:
            _, proc = self.procs[-1]
            try:
                self.stop(proc)
            except Exception:  # noqa: BLE001 - keep stopping the others
                self.procs.pop()


class LineReader:
    """Reads whole lines from a child's stdout with a deadline (select + os.read, no buffering surprises)."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str, children: Children) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buf = b""
        self.proc, self.name, self.children = proc, name, children

    def line(self, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no {what} after {timeout:.0f}s\n{self.children.log_tail(self.name)}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise BenchError(f"{self.name} exited ({self.proc.returncode}) before {what}:\n"
                                     f"{self.children.log_tail(self.name)}")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_delay(pid: int) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (/proc/<pid>/task/*/schedstat):
    time other processes took on the server's core. Threads that exited are not counted."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
    return total / 1e9


def lowest_priority(pid: int) -> None:
    """Nice 19 for every thread of ``pid`` (threads it starts later inherit it). OpenBao shares
    the load generator's core: at a rotation its work must not delay the client's own
    timestamps, or the p99 around a rotation would measure the client, not the broker."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that has just exited
            os.setpriority(os.PRIO_PROCESS, int(tid), 19)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# --- configs -------------------------------------------------------------------------------

def _dur(seconds: float) -> str:
    return f"{int(round(seconds * 1000))}ms"


def write_broker_config(directory: Path, pki: Path, vault_address: str, approle: AppRoleFiles, port: int,
                        ops_port: int, ttl: float, grace: float, rotate_after: float,
                        tls_engine: str | None = None) -> Path:
    """The shape tests/conftest.py ``write_config`` produces; rate limit off so the load is not throttled."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = f'tls_engine = "{tls_engine}"\n' if tls_engine else ""
    text = f"""\
[server]
listen = "127.0.0.1:{port}"
cert = "{pki}/server.pem"
key = "{pki}/server.key"
client_ca = "{pki}/ca.pem"
rate_limit = 0
{engine}
[ops]
listen = "127.0.0.1:{ops_port}"

[audit]
path = "{directory}/audit.jsonl"

[state]
dir = "{directory}/state"

[vault]
address = "{vault_address}"
timeout = "5s"

[[vault.auth]]
method = "approle"
role_id_file = "{approle.role_id_file}"
secret_id_file = "{approle.secret_id_file}"

[admin]
allow = ["cn:ops"]

[profiles.demo]
token_role = "{BROKER_ROLE}"
policies = ["{POLICY}"]
ttl = "{_dur(ttl)}"
grace = "{_dur(grace)}"
rotate_after = "{_dur(rotate_after)}"
check_interval = "{CHECK_INTERVAL:g}s"
allow = ["cn:job"]
"""
    path = directory / "broker.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def write_proxy_config(directory: Path, pki: Path, vault_address: str, approle: AppRoleFiles, port: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = f"""\
# bao proxy as the peer: mTLS listener (TLS 1.3 only, client cert required and verified against
# the same CA as the broker's), auto-auth with an AppRole, and the lease cache, which answers a
# repeated identical POST auth/token/create/{PROXY_ROLE} from memory.
vault {{
  address = "{vault_address}"
}}

auto_auth {{
  method "approle" {{
    config = {{
      role_id_file_path = "{approle.role_id_file}"
      secret_id_file_path = "{approle.secret_id_file}"
      remove_secret_id_file_after_reading = false
    }}
  }}
}}

cache {{
}}

api_proxy {{
  use_auto_auth_token = true
}}

listener "tcp" {{
  address = "127.0.0.1:{port}"
  tls_cert_file = "{pki}/server.pem"
  tls_key_file = "{pki}/server.key"
  tls_min_version = "tls13"
  tls_require_and_verify_client_cert = true
  tls_client_ca_file = "{pki}/ca.pem"
}}
"""
    path = directory / "proxy.hcl"
    path.write_text(text)
    return path


# --- one-off mTLS requests (setup and checks; never in a measured window) ------------------

def mtls_context(pki: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(pki / "ca.pem")
    ctx.load_cert_chain(pki / "job.pem", pki / "job.key")
    return ctx


def mtls_request(ctx: ssl.SSLContext, port: int, method: str, path: str,
                 body: str | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=5)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# --- the run -------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    ops_port: int = 0
    ready_seconds: float = 0.0
    directory: Path | None = None
    request: dict[str, Any] = field(default_factory=dict)  # method, path, body, expect

    @property
    def pid(self) -> int:
        return self.proc.pid


class Bench:
    def __init__(self, s: Settings, workdir: Path) -> None:
        self.s = s
        self.workdir = workdir
        self.children = Children(workdir)
        cpus = sorted(os.sched_getaffinity(0))
        self.server_cpus = {cpus[0]}
        self.load_cpus = {cpus[1]} if len(cpus) > 1 else {cpus[0]}
        self.pki = workdir / "pki"
        self.vault: OpenBaoDevServer | None = None
        self.results: dict[str, Any] = {"runs": {}}
        self.notes: list[str] = []
        if len(cpus) < 2:
            self.notes.append("Only one CPU is available: servers and load generator share it; "
                              "numbers are not comparable with a 2-core run.")

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    # setup ----------------------------------------------------------------------------------

    def start_vault(self) -> None:
        self.log("starting OpenBao dev server")
        self.vault = OpenBaoDevServer(log_path=self.workdir / "openbao.log")
        old = os.environ.get("GOMAXPROCS")
        os.environ["GOMAXPROCS"] = "1"
        try:
            # On the load generator's core, not the servers': in production Vault is another
            # machine, so its work at a rotation must neither count against the broker nor
            # take the broker's core away from the fetches being timed.
            with affinity(self.load_cpus):
                self.vault.start()
        finally:
            if old is None:
                os.environ.pop("GOMAXPROCS", None)
            else:
                os.environ["GOMAXPROCS"] = old
        if self.vault_pid is not None:
            lowest_priority(self.vault_pid)
        v = self.vault
        setup_token_role(v, BROKER_ROLE, [POLICY])
        # The same role for the proxy, but renewable: bao proxy's lease cache passes a
        # non-renewable token through to OpenBao on every request ("secret not renewable").
        v.bao("write", f"auth/token/roles/{PROXY_ROLE}", f"allowed_policies={POLICY}", "orphan=true",
              "renewable=true", "token_explicit_max_ttl=24h")
        self.broker_approle = setup_approle(v, [BROKER_ROLE], self.workdir / "broker-secrets", role_name="broker")
        self.proxy_approle = setup_approle(v, [PROXY_ROLE], self.workdir / "proxy-secrets", role_name="proxy")

    @property
    def vault_pid(self) -> int | None:
        proc = getattr(self.vault, "_proc", None)
        return proc.pid if proc is not None else None

    def make_pki(self) -> None:
        certs.init_ca_and_server(self.pki, hosts=("localhost", "127.0.0.1"))
        certs.issue_client(self.pki, "job")
        self.ctx = mtls_context(self.pki)

    def broker_argv(self, config: Path) -> list[str]:
        script = Path(sys.executable).parent / "broker"
        if script.exists():
            return [str(script), "serve", "--config", str(config)]
        return [sys.executable, "-m", "broker", "serve", "--config", str(config)]

    def broker_env(self) -> dict[str, str]:
        """The broker's environment: no BAO_/VAULT_ variables, and byte-code cached in the work
        directory. Without a cache (PYTHONDONTWRITEBYTECODE=1 and a source tree without
        __pycache__) every start would compile the broker's modules, which is not what an
        installed broker does; :meth:`warm_bytecode` fills it before the first timed start."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(self.workdir / "pycache")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

    def warm_bytecode(self) -> None:
        """Import what ``broker serve`` imports once, untimed: byte-code and page cache are warm."""
        code = "import broker.cli, broker.config, broker.service"
        done = subprocess.run([sys.executable, "-c", code], env=self.broker_env(), cwd=self.workdir,
                              capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise BenchError(f"cannot import the broker: {done.stderr.strip()[-2000:]}")

    def start_broker(self, name: str, ttl: float, grace: float, rotate_after: float) -> Server:
        assert self.vault is not None
        port, ops_port = free_port(), free_port()
        directory = self.workdir / name
        config = write_broker_config(directory, self.pki, self.vault.address, self.broker_approle, port, ops_port,
                                     ttl, grace, rotate_after, self.s.tls_engine)
        env = self.broker_env()
        self.log(f"starting {name} (broker serve) on 127.0.0.1:{port}")
        t0 = time.perf_counter()
        proc = self.children.spawn(name, self.broker_argv(config), cpus=self.server_cpus, env=env)
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}:\n{self.children.log_tail(name)}")
            try:
                status, _ = http_get(f"http://127.0.0.1:{ops_port}/readyz", timeout=1)
            except OSError:
                status = 0
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{name} not ready after 30s:\n{self.children.log_tail(name)}")
            time.sleep(0.005)
        ready = time.perf_counter() - t0
        server = Server(name, proc, port, ops_port, ready, directory,
                        {"method": "GET", "path": "/v1/tokens/demo", "body": "", "expect": '"token"'})
        status, _, body = mtls_request(self.ctx, port, "GET", "/v1/tokens/demo")
        if status != 200:
            raise BenchError(f"{name}: GET /v1/tokens/demo answered {status}: {body[:200]!r}")
        self.log(f"{name} ready in {ready:.3f}s")
        return server

    def start_proxy(self) -> Server:
        assert self.vault is not None
        port = free_port()
        config = write_proxy_config(self.workdir / "proxy", self.pki, self.vault.address, self.proxy_approle, port)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        env["GOMAXPROCS"] = "1"
        self.log(f"starting bao proxy on 127.0.0.1:{port}")
        t0 = time.perf_counter()
        proc = self.children.spawn("bao-proxy", [bao_binary(), "proxy", f"-config={config}",
                                                 f"-log-level={self.s.proxy_log_level}"],
                                   cpus=self.server_cpus, env=env)
        path = f"/v1/auth/token/create/{PROXY_ROLE}"
        deadline = time.monotonic() + 30
        first: tuple[int, dict[str, str], bytes] | None = None
        while True:
            if proc.poll() is not None:
                raise BenchError(f"bao proxy exited with {proc.returncode}:\n{self.children.log_tail('bao-proxy')}")
            try:
                first = mtls_request(self.ctx, port, "POST", path, PROXY_BODY)
            except (OSError, ssl.SSLError, http.client.HTTPException):
                first = None
            if first is not None and first[0] == 200:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"bao proxy gave no token in 30s (last: {first and first[0]}):\n"
                                 f"{self.children.log_tail('bao-proxy')}")
            time.sleep(0.005)
        ready = time.perf_counter() - t0
        # Prove the request is answered from the cache: the same token comes back, marked as a hit.
        accessor = json.loads(first[2])["auth"]["accessor"]
        for _ in range(2):
            status, headers, body = mtls_request(self.ctx, port, "POST", path, PROXY_BODY)
            again = json.loads(body)["auth"]["accessor"] if status == 200 else None
            hit = headers.get("x-cache") == "HIT" or "age" in headers
            if again != accessor or not hit:
                raise BenchError("bao proxy is not answering token-create from its cache "
                                 f"(status {status}, same token: {again == accessor}, X-Cache: "
                                 f"{headers.get('x-cache')}); the comparison would be meaningless")
        self.log(f"bao proxy serving a cached token {ready:.3f}s after start")
        return Server("bao-proxy", proc, port, 0, ready, None,
                      {"method": "POST", "path": path, "body": PROXY_BODY, "expect": '"client_token"'})

    # measurements ---------------------------------------------------------------------------

    def load(self, server: Server, mode: str, connections: int, seconds: float, *, rate: float = 0.0,
             samples: Path | None = None, on_ready: Callable[[], None] | None = None,
             on_done: Callable[[], None] | None = None) -> dict[str, Any]:
        spec = {
            "mode": mode, "host": "127.0.0.1", "server_name": "localhost", "port": server.port,
            "ca": str(self.pki / "ca.pem"), "cert": str(self.pki / "job.pem"), "key": str(self.pki / "job.key"),
            "connections": connections, "seconds": seconds, "warmup": self.s.warmup, "rate": rate,
            "samples": str(samples) if samples else None, "parallel": 32, **server.request,
        }
        name = f"loadgen-{server.name}-{mode}"
        proc = self.children.spawn(name, [sys.executable, str(LOADGEN), json.dumps(spec)], cpus=self.load_cpus,
                                   pipes=True)
        assert proc.stdin is not None
        reader = LineReader(proc, name, self.children)
        try:
            ready = reader.line(60 + self.s.warmup * 3, "READY")
            if not ready.startswith("READY"):
                raise BenchError(f"{name}: expected READY, got {ready[:200]!r}")
            ready_info = json.loads(ready[6:])
            if on_ready:
                on_ready()
            vault_pid = self.vault_pid
            cpu0, wait0 = cpu_seconds(server.pid), run_delay(server.pid)
            vcpu0 = cpu_seconds(vault_pid) if vault_pid else 0.0
            proc.stdin.write(b"GO\n")
            proc.stdin.flush()
            done = reader.line(seconds + 60, "DONE")
            cpu1, wait1 = cpu_seconds(server.pid), run_delay(server.pid)
            vcpu1 = cpu_seconds(vault_pid) if vault_pid else 0.0
            if done != "DONE":
                raise BenchError(f"{name}: expected DONE, got {done[:200]!r}")
            if on_done:
                on_done()
            result_line = reader.line(30, "RESULT")
            result: dict[str, Any] = json.loads(result_line.partition(" ")[2])
            proc.wait(timeout=15)
        finally:
            self.children.stop(proc)
        result["ready_info"] = ready_info
        result["server_cpu_s"] = cpu1 - cpu0
        result["server_cpu_wait_s"] = wait1 - wait0
        result["openbao_cpu_s"] = vcpu1 - vcpu0
        fetches = result.get("fetches", 0)
        result["server_cpu_per_fetch"] = (cpu1 - cpu0) / fetches if fetches else None
        elapsed = result.get("elapsed") or 0
        result["server_busy"] = (cpu1 - cpu0) / elapsed if elapsed else None
        result["rss_after"] = rss_bytes(server.pid)
        return result

    def idle_rss(self, server: Server) -> dict[str, Any]:
        n = self.s.idle_connections
        holder: dict[str, Any] = {}

        def measure() -> None:
            time.sleep(1.0)  # let the server settle after the last handshake
            holder["rss"] = rss_bytes(server.pid)

        result = self.load(server, "idle", n, 0.0, on_ready=measure)
        result["rss"] = holder["rss"]
        opened = result["ready_info"].get("open", 0)
        if opened < n:
            self.notes.append(f"{server.name}: only {opened} of {n} idle connections opened "
                              f"({result['ready_info'].get('errors')}).")
        if result.get("still_open", 0) < opened:
            self.notes.append(f"{server.name}: {opened - result['still_open']} of {opened} idle connections "
                              "were closed by the server before the measurement ended.")
        return result

    def broker_metrics(self, server: Server) -> dict[str, float]:
        status, body = http_get(f"http://127.0.0.1:{server.ops_port}/metrics")
        if status != 200:
            raise BenchError(f"{server.name} /metrics answered {status}")
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line.startswith("broker_vault_requests_total{"):
                labels, _, value = line.rpartition(" ")
                out[labels[len("broker_vault_requests_total"):]] = float(value)
        return out

    def audit_events(self, server: Server) -> list[dict[str, Any]]:
        assert server.directory is not None
        events = []
        path = server.directory / "audit.jsonl"
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") not in ("token_served",):
                    events.append(event)
        return events

    def run_rotation(self) -> dict[str, Any]:
        s = self.s
        broker = self.start_broker("broker-rotation", s.rotation_ttl, s.rotation_grace, s.rotation_after)
        before: dict[str, float] = {}
        after: dict[str, float] = {}
        window: dict[str, float] = {}

        def on_ready() -> None:
            before.update(self.broker_metrics(broker))
            window["go"] = time.time()

        def on_done() -> None:
            window["done"] = time.time()
            after.update(self.broker_metrics(broker))

        samples_path = self.workdir / "rotation-samples.json"
        self.log(f"rotation run: {s.rotation_seconds:g}s at {s.rotation_rate:g} fetches/s, ttl {s.rotation_ttl:g}s, "
                 f"rotate_after {s.rotation_after:g}s, grace {s.rotation_grace:g}s")
        result = self.load(broker, "keepalive", s.rotation_connections, s.rotation_seconds, rate=s.rotation_rate,
                           samples=samples_path, on_ready=on_ready, on_done=on_done)
        samples = json.loads(samples_path.read_text())
        events = self.audit_events(broker)
        result["ready_seconds"] = broker.ready_seconds
        self.children.stop(broker.proc)

        def ts(event: dict[str, Any]) -> float:
            return dt.datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()

        go, done = window["go"], window["done"]
        rotations = sorted(ts(e) for e in events if e.get("event") == "token_rotated" and go <= ts(e) <= done)
        revocations = sorted(ts(e) for e in events if e.get("event") == "token_revoked" and go <= ts(e) <= done)
        vault_activity = sorted(ts(e) for e in events if e.get("event") != "token_denied")
        by_op: dict[str, float] = {}
        for key, value in after.items():
            delta = value - before.get(key, 0.0)
            if delta:
                by_op[key] = delta
        vault_requests = sum(by_op.values())

        starts, latencies = samples["start"], samples["latency"]
        near, quiet = [], []
        per_rotation: list[list[float]] = [[] for _ in rotations]
        for start, latency in zip(starts, latencies):
            i = bisect.bisect_left(rotations, start)
            nearest = [j for j in (i - 1, i) if 0 <= j < len(rotations)]
            close = [j for j in nearest if abs(rotations[j] - start) <= 0.5]
            if close:
                near.append(latency)
                per_rotation[close[0]].append(latency)
            k = bisect.bisect_left(vault_activity, start)
            if all(abs(vault_activity[j] - start) > 0.5 for j in (k - 1, k) if 0 <= j < len(vault_activity)):
                quiet.append(latency)
        fetches = result["fetches"]
        result.update({
            "rotations": len(rotations), "revocations": len(revocations), "vault_requests": vault_requests,
            "vault_requests_by_operation": by_op,
            "vault_per_1000": vault_requests / fetches * 1000 if fetches else None,
            "vault_per_rotation": vault_requests / len(rotations) if rotations else None,
            "p99_rotation": _q(near, 0.99), "p99_quiet": _q(quiet, 0.99),
            "samples_rotation": len(near), "samples_quiet": len(quiet),
            "p99_each_rotation": [_q(v, 0.99) for v in per_rotation],
            "go": go, "done": done, "rotation_times": rotations, "revocation_times": revocations,
        })
        if not rotations:
            self.notes.append("The rotation run saw no rotation: lengthen --rotation-seconds or shorten "
                              "--rotation-after.")
        if self.s.plot:
            result["plot"] = self.plot(starts, latencies, rotations, revocations, go)
        return result

    def plot(self, starts: list[float], latencies: list[float], rotations: list[float], revocations: list[float],
             t0: float) -> str | None:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.notes.append("matplotlib is not installed, so no latency.png (pip install matplotlib).")
            return None
        x = [v - t0 for v in starts]
        y = [v * 1000 for v in latencies]
        fig, ax = plt.subplots(figsize=(11, 5))
        ax.scatter(x, y, s=2, alpha=0.25, color="tab:blue", label="one fetch", rasterized=True)
        width = 0.25
        bins: dict[int, list[float]] = {}
        for xi, yi in zip(x, y):
            bins.setdefault(int(xi // width), []).append(yi)
        keys = sorted(bins)
        ax.plot([(k + 0.5) * width for k in keys], [_q(bins[k], 0.99) for k in keys], color="black", lw=1,
                label=f"p99 per {int(width * 1000)} ms")
        for i, t in enumerate(rotations):
            ax.axvline(t - t0, color="tab:red", ls="--", lw=1, label="rotation (token_rotated)" if i == 0 else None)
        for i, t in enumerate(revocations):
            ax.axvline(t - t0, color="tab:orange", ls=":", lw=1,
                       label="previous token revoked (token_revoked)" if i == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("seconds since the start of the measured window")
        ax.set_ylabel("latency, ms (log)")
        ax.set_title(f"broker: fetch latency across rotations ({self.s.rotation_rate:g} fetches/s paced, "
                     f"{self.s.rotation_connections} keep-alive connections)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize=8, frameon=False)
        ax.grid(True, which="both", alpha=0.2)
        fig.tight_layout()
        path = self.s.output_dir / "latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return str(path)

    def run(self) -> None:
        s = self.s
        raise_nofile(s.idle_connections + s.connections + 1024)
        os.sched_setaffinity(0, self.load_cpus)
        self.results["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
        self.make_pki()
        self.warm_bytecode()
        self.start_vault()
        broker = self.start_broker("broker", 3600.0, 900.0, 2400.0)
        proxy = self.start_proxy()
        runs = self.results["runs"]
        servers = (broker, proxy)
        for srv in servers:
            runs[f"rss_start_{srv.name}"] = rss_bytes(srv.pid)
        for srv in servers:
            self.log(f"{srv.name}: {s.idle_connections} idle TLS connections")
            runs[f"idle_{srv.name}"] = self.idle_rss(srv)
        vault_before = self.broker_metrics(broker)
        for mode, conns in (("keepalive", s.connections), ("fresh", s.fresh_concurrency)):
            for i in range(s.repeat):
                # Alternating who goes first spreads slow drifts of the machine over both.
                for srv in servers if i % 2 == 0 else servers[::-1]:
                    self.log(f"{srv.name}: {mode} {i + 1}/{s.repeat}, {conns} "
                             f"{'connections' if mode == 'keepalive' else 'workers'}, {s.seconds:g}s")
                    r = self.load(srv, mode, conns, s.seconds)
                    runs.setdefault(f"{mode}_{srv.name}_each", []).append(r)
                    self.log(f"  {r['fetches']} fetches, {r['fetches_per_s']:.0f}/s, server CPU/fetch "
                             f"{_fmt_cpu(r['server_cpu_per_fetch'])}, server busy {_pct(r['server_busy'])}, "
                             f"load generator busy {_pct(r['client_busy'])}")
                    time.sleep(0.5)
            for srv in servers:
                runs[f"{mode}_{srv.name}"] = median_run(runs[f"{mode}_{srv.name}_each"])
        vault_after = self.broker_metrics(broker)
        runs["broker_vault_requests_during_load"] = {k: v - vault_before.get(k, 0.0) for k, v in vault_after.items()
                                                     if v - vault_before.get(k, 0.0)}
        for srv in servers:
            runs[f"rss_after_{srv.name}"] = rss_bytes(srv.pid)
        runs["ready_broker"] = broker.ready_seconds
        runs["ready_bao-proxy"] = proxy.ready_seconds
        self.children.stop(broker.proc)
        runs["rotation"] = rot = self.run_rotation()
        runs["ready_broker_rotation"] = rot["ready_seconds"]
        self.results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        self.check_runs()

    def check_runs(self) -> None:
        each = [(name if len(rs) == 1 else f"{name} #{i + 1}", r)
                for key, rs in self.results["runs"].items() if key.endswith("_each")
                for name in [key.removesuffix("_each")] for i, r in enumerate(rs)]
        for key, r in each + [("rotation", self.results["runs"]["rotation"])]:
            bad = {k: v for k, v in r.get("statuses", {}).items() if k != "200"}
            if r.get("errors") or bad or r.get("bad_body"):
                self.notes.append(f"{key}: errors {r.get('errors')}, non-200 statuses {bad}, "
                                  f"unexpected bodies {r.get('bad_body')}.")
            if (r.get("client_busy") or 0) > 0.9 and (r.get("server_busy") or 0) < 0.9:
                self.notes.append(f"{key}: the load generator's core was the limit (client busy "
                                  f"{_pct(r['client_busy'])}, server busy {_pct(r['server_busy'])}); fetches/s "
                                  "and latency there say more about the client than the server.")
            elapsed = r.get("elapsed") or 0
            if elapsed and max(r.get("server_cpu_wait_s", 0), r.get("client_cpu_wait_s", 0)) > 0.05 * elapsed:
                self.notes.append(f"{key}: runnable but not running for a while (server "
                                  f"{r.get('server_cpu_wait_s', 0):.2f} s, load generator "
                                  f"{r.get('client_cpu_wait_s', 0):.2f} s of {elapsed:.1f} s): another process "
                                  "had the core, or the process's own threads waited for each other on its "
                                  "pinned core (bao proxy runs several Go runtime threads); CPU per fetch counts "
                                  "only time on the CPU.")
            if r.get("late_sends"):
                self.notes.append(f"{key}: {r['late_sends']} paced sends went out more than 5 ms late "
                                  "(the load generator fell behind).")
        during = self.results["runs"].get("broker_vault_requests_during_load", {})
        unexpected = {k: v for k, v in during.items() if "lookup_accessor" not in k}  # the periodic check
        if unexpected:
            self.notes.append(f"The broker made Vault requests during the side-by-side runs: {unexpected} "
                              "(expected none but the periodic check: no rotation is due).")


def median_run(each: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median server CPU per fetch (the lower middle one of an even count):
    the table's other numbers for that server and mode come from the same run."""
    ordered = sorted(each, key=lambda r: r["server_cpu_per_fetch"] or 0.0)
    return ordered[(len(ordered) - 1) // 2]


# --- formatting ----------------------------------------------------------------------------

def _q(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _ops(by_op: dict[str, float]) -> str:
    return ", ".join(f"`{k}` {v:.0f}" for k, v in sorted(by_op.items())) or "none"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 100:.0f}%"


def _fmt_cpu(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v * 1e6:.0f} µs" if v < 1e-3 else f"{v * 1e3:.2f} ms"


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v * 1e3:.2f} ms" if v < 0.1 else f"{v * 1e3:.0f} ms"


def _fmt_rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def _fmt_mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 1e6:.1f} MB"


def _fmt_s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def table_rows(results: dict[str, Any], s: Settings) -> list[tuple[str, str, str, str, str, str]]:
    """(key, metric, broker, proxy, ratio, target) per row, in ROWS order."""
    runs = results["runs"]
    b, p = "broker", "bao-proxy"
    rows: list[tuple[str, str, str, str, str, str]] = []

    def pair(key: str, label: str, fmt: Callable[[Any], str], bv: Any, pv: Any, target: str = "") -> None:
        rows.append((key, label, fmt(bv), fmt(pv), _ratio(bv, pv), target))

    def alone(key: str, label: str, value: str, target: str = "") -> None:
        rows.append((key, label, value, "—", "—", target))

    ka_b, ka_p, fr_b, fr_p = runs[f"keepalive_{b}"], runs[f"keepalive_{p}"], runs[f"fresh_{b}"], runs[f"fresh_{p}"]
    pair("cpu_keepalive", f"server CPU per fetch, keep-alive ({s.connections} connections)", _fmt_cpu,
         ka_b["server_cpu_per_fetch"], ka_p["server_cpu_per_fetch"], "ratio ≤ 0.8")
    pair("cpu_fresh", f"server CPU per fetch, new mTLS connection per fetch ({s.fresh_concurrency} concurrent)",
         _fmt_cpu, fr_b["server_cpu_per_fetch"], fr_p["server_cpu_per_fetch"], "ratio ≤ 0.8")
    pair("rate_keepalive", "fetches/s, keep-alive", _fmt_rate, ka_b["fetches_per_s"], ka_p["fetches_per_s"])
    pair("rate_fresh", "fetches/s, new connection per fetch", _fmt_rate, fr_b["fetches_per_s"], fr_p["fetches_per_s"])
    pair("p50_keepalive", "p50 latency, keep-alive", _fmt_ms, ka_b["p50"], ka_p["p50"])
    pair("p99_keepalive", "p99 latency, keep-alive", _fmt_ms, ka_b["p99"], ka_p["p99"])
    pair("p50_fresh", "p50 latency, new connection per fetch", _fmt_ms, fr_b["p50"], fr_p["p50"])
    pair("p99_fresh", "p99 latency, new connection per fetch", _fmt_ms, fr_b["p99"], fr_p["p99"])
    pair("rss_after_load", "RSS after the load runs", _fmt_mb, runs[f"rss_after_{b}"], runs[f"rss_after_{p}"])
    pair("rss_idle_conns", f"RSS with {s.idle_connections:,} idle TLS connections open", _fmt_mb,
         runs[f"idle_{b}"]["rss"], runs[f"idle_{p}"]["rss"], "broker ≤ 60 MB")
    ready_b = [runs["ready_broker"], runs["ready_broker_rotation"]]
    pair("ready", "start to ready (broker: /readyz 200; proxy: first token served), OpenBao up", _fmt_s,
         max(ready_b), runs[f"ready_{p}"], "broker ≤ 1 s")
    rot = runs["rotation"]
    alone("vault_per_1000", f"Vault requests per 1,000 fetches (broker alone: {rot['rotations']} rotations, "
                            f"{rot['fetches']:,} fetches in {s.rotation_seconds:g} s)",
          "n/a" if rot["vault_per_1000"] is None else f"{rot['vault_per_1000']:.2f}")
    hourly = vault_per_1000_hourly(rot["vault_per_rotation"], s.rotation_rate)
    alone("vault_per_1000_hourly", f"Vault requests per 1,000 fetches at 1 rotation/h, projected from this run "
                                   f"({s.rotation_rate:g} fetches/s; + one check per {CHECK_INTERVAL:g} s)",
          "n/a" if hourly is None else f"{hourly:.3f}", "≤ 1")
    alone("vault_per_rotation", "Vault requests per rotation (mint, verify, revoke previous)",
          "n/a" if rot["vault_per_rotation"] is None else f"{rot['vault_per_rotation']:.1f}")
    alone("p99_rotation", f"p99 latency within ±0.5 s of a rotation ({s.rotation_rate:g} fetches/s paced)",
          _fmt_ms(rot["p99_rotation"]))
    alone("p99_quiet", "p99 latency in quiet time (> 0.5 s from any Vault call)", _fmt_ms(rot["p99_quiet"]))
    alone("p99_rotation_ratio", "p99 around a rotation ÷ p99 quiet", _ratio(rot["p99_rotation"], rot["p99_quiet"]),
          "≤ 1.1")
    assert tuple(r[0] for r in rows) == ROWS
    return rows


def vault_per_1000_hourly(per_rotation: float | None, fetches_per_s: float) -> float | None:
    """An hour of traffic with one rotation: that rotation's Vault requests (as measured) plus
    the periodic checks of ``current``, per 1,000 of the hour's fetches."""
    if per_rotation is None or fetches_per_s <= 0:
        return None
    return (per_rotation + 3600 / CHECK_INTERVAL) / (fetches_per_s * 3600) * 1000


def markdown_table(rows: list[tuple[str, str, str, str, str, str]]) -> str:
    lines = ["| metric | broker | bao proxy | broker/proxy | target (issue 5) |", "|---|---:|---:|---:|---|"]
    lines += [f"| {m} | {b} | {p} | {r} | {t} |" for _, m, b, p, r, t in rows]
    return "\n".join(lines)


def _version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def default_tls_engine() -> str:
    """The broker's default [server] tls_engine, or "stdlib" for a broker from before the setting."""
    import dataclasses

    from broker.config import ServerConfig
    for f in dataclasses.fields(ServerConfig):
        if f.name == "tls_engine" and isinstance(f.default, str):
            return f.default
    return "stdlib"


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        bundled = backend.openssl_version_text()
    except Exception:  # noqa: BLE001
        bundled = "unknown"
    import aiohttp
    try:
        import uvloop
        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    git = _version(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()), "cpu": model, "kernel": platform.release(),
        "python": platform.python_version(), "ssl": ssl.OPENSSL_VERSION, "cryptography_openssl": bundled,
        "aiohttp": aiohttp.__version__, "uvloop": uv,
        "bao": _version([bao_binary(), "version"]).split(" (")[0], "git": git or "unknown",
    }


def render(results: dict[str, Any], s: Settings, rows: list[tuple[str, str, str, str, str, str]],
           notes: list[str]) -> str:
    m = results["machine"]
    runs = results["runs"]
    rot = runs["rotation"]
    out = [
        "# Benchmark: broker vs bao proxy",
        "",
        f"Run {m['date']} with `python -m bench.run{' --quick' if s.quick else ''}` (git {m['git']}).",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}; Python {m['python']}, "
        f"{m['ssl']} (stdlib `ssl`), {m['cryptography_openssl']} (in `cryptography`), aiohttp {m['aiohttp']}, "
        f"uvloop {m['uvloop']}, {m['bao']}. Servers pinned to CPU {sorted(results['server_cpus'])}, load generator "
        f"and OpenBao to CPU {sorted(results['load_cpus'])}. Load average at start {' '.join(results['loadavg_start'])}, "
        f"at end {' '.join(results['loadavg_end'])}: other work on the machine shows up as noise.",
        "",
        f"Settings: broker TLS engine `{results['tls_engine']}`; {s.seconds:g} s per load run after {s.warmup:g} s "
        "warm-up; ECDSA P-256 certificates, TLS 1.3, "
        "client certificate required; the broker serves `GET /v1/tokens/demo` from its cache, bao proxy "
        f"answers `POST /v1/auth/token/create/{PROXY_ROLE}` from its lease cache (see bench/README.md).",
        "",
        markdown_table(rows),
        "",
    ]
    if notes:
        out += ["Notes from this run:", ""] + [f"- {n}" for n in notes] + [""]
    out += ["## Details", "",
            "Busy = CPU time / wall time of the window; waited = time runnable but not running (another "
            "process had the core: noise).", "",
            "| run | fetches | seconds | server busy | server waited | load generator busy | load generator waited "
            "| OpenBao CPU |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in ("keepalive_broker", "keepalive_bao-proxy", "fresh_broker", "fresh_bao-proxy", "rotation"):
        r = runs[key]
        out.append(f"| {key} | {r['fetches']:,} | {r['elapsed']:.1f} | {_pct(r['server_busy'])} | "
                   f"{r['server_cpu_wait_s']:.2f} s | {_pct(r['client_busy'])} | {r['client_cpu_wait_s']:.2f} s | "
                   f"{r['openbao_cpu_s']:.2f} s |")
    ops = _ops(rot["vault_requests_by_operation"])
    each = ", ".join(_fmt_ms(v) for v in rot["p99_each_rotation"]) or "n/a"
    spread = "; ".join(
        f"{label}: broker {', '.join(_fmt_cpu(r['server_cpu_per_fetch']) for r in runs[f'{mode}_broker_each'])}, "
        f"bao proxy {', '.join(_fmt_cpu(r['server_cpu_per_fetch']) for r in runs[f'{mode}_bao-proxy_each'])}"
        for mode, label in (("keepalive", "keep-alive"), ("fresh", "new connection per fetch")))
    out += [
        "",
        f"- Server CPU per fetch in each of the {s.repeat} side-by-side run(s) per mode, broker and proxy "
        f"alternating (the table shows each one's median run): {spread}.",
        f"- RSS right after start, no connections: broker {_fmt_mb(runs['rss_start_broker'])}, "
        f"bao proxy {_fmt_mb(runs['rss_start_bao-proxy'])}.",
        "- Start to ready, each broker start: "
        f"{', '.join(_fmt_s(runs[k]) for k in ('ready_broker', 'ready_broker_rotation'))} "
        "(the table shows the slower).",
        "- Broker Vault requests during the side-by-side runs (a shared-profile fetch never calls Vault; "
        "`lookup_accessor` is the periodic check of `current`, every `check_interval` = 60 s): "
        f"{_ops(runs['broker_vault_requests_during_load'])}.",
        f"- Rotation run (profile ttl {s.rotation_ttl:g} s, rotate_after {s.rotation_after:g} s, grace "
        f"{s.rotation_grace:g} s, {s.rotation_connections} connections paced at {s.rotation_rate:g} fetches/s): "
        f"{rot['rotations']} rotations, {rot['revocations']} revocations, Vault requests {ops}; "
        f"{rot['samples_rotation']:,} fetches within ±0.5 s of a rotation, {rot['samples_quiet']:,} in quiet time; "
        f"p99 around each rotation: {each}.",
    ]
    if rot.get("plot"):
        out += ["", "![latency across rotations](latency.png)"]
    return "\n".join(out) + "\n"


# --- entry point ---------------------------------------------------------------------------

def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _on_alarm(signum: int, frame: object) -> None:
    raise TimeoutError("the benchmark exceeded its time budget (--timeout)")


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    s.output_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    bench = Bench(s, workdir)
    # SIGINT too: a shell that starts us in the background sets it to "ignore", which Python keeps.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(int(s.timeout) + 1)
    code = 1
    try:
        bench.run()
        bench.results["machine"] = machine()
        bench.results["server_cpus"], bench.results["load_cpus"] = bench.server_cpus, bench.load_cpus
        bench.results["tls_engine"] = s.tls_engine or f"{default_tls_engine()} (the default)"
        rows = table_rows(bench.results, s)
        text = render(bench.results, s, rows, bench.notes)
        (s.output_dir / "results.md").write_text(text)
        if s.json_path:
            raw = {**bench.results, "server_cpus": sorted(bench.server_cpus), "load_cpus": sorted(bench.load_cpus),
                   "notes": bench.notes, "settings": {k: str(v) for k, v in vars(s).items()}}
            s.json_path.write_text(json.dumps(raw, indent=1, default=str))
        print(markdown_table(rows))
        if bench.notes:
            print()
            for note in bench.notes:
                print(f"- {note}")
        print(f"\nwrote {s.output_dir / 'results.md'}"
              + (f" and {bench.results['runs']['rotation']['plot']}" if bench.results["runs"]["rotation"].get("plot")
                 else ""))
        code = 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        code = 130
    except (BenchError, TimeoutError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        code = 1
    finally:
        signal.alarm(0)
        with contextlib.suppress(KeyboardInterrupt):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
            bench.children.stop_all()
            if bench.vault is not None:
                bench.vault.stop()
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if s.keep or code not in (0, 130):
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
