"""Wires the broker together and runs it: listeners, authenticator, revocation queue and one
rotator per shared profile, all in one TaskGroup; clean shutdown in reverse order."""

from __future__ import annotations

import asyncio
import logging
import random
import resource
import signal
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry

from broker import tls
from broker.api.app import DEPS, ApiDeps, make_app, protocol_factory
from broker.api.fastpath import FastPathConnections
from broker.api.ratelimit import RateLimiter
from broker.audit import AuditLog, rfc3339
from broker.clock import Clock, SystemClock
from broker.config import Config, load_config
from broker.errors import CertError, ConfigError
from broker.metrics import Metrics
from broker.ops.server import OpsDeps, make_ops_app
from broker.tlsengine import ReloadableOpenSSLContext, listener_context, tls_protocol_factory
from broker.tokens.families import FamilyManager
from broker.tokens.model import TokenCache
from broker.tokens.revocations import RevocationPending, RevocationQueue
from broker.tokens.rotator import Rotator
from broker.tokens.store import PendingRevocation, StateStore
from broker.vault.auth import Authenticator, method_from_config
from broker.vault.client import WORKER_THREAD_PREFIX, VaultClient, VaultClientConfig

log = logging.getLogger("broker.service")

SHUTDOWN_TIMEOUT = 10.0  # in-flight requests get this long to finish on SIGTERM
LOGOUT_TIMEOUT = 5.0  # on shutdown, at most this long revoking the broker's own Vault login
# revoke_on_shutdown: Vault gets this long for every token. With the two above it stays within
# the 30 s TimeoutStopSec of examples/systemd; what is left stays queued for the next start.
SHUTDOWN_REVOKE_TIMEOUT = 10.0
SHUTDOWN_QUEUE_WAIT = 1.0  # per profile, for a rotation in flight to let go of its slots
FAMILY_VAULT_WORKERS = 4  # threads for per-job family calls to Vault, apart from the broker's own 4


class TLSSockSite(web.SockSite):
    """aiohttp's SockSite on our TLS engine: pyOpenSSL over memory BIOs by default, or the
    stdlib's ``ssl`` (``[server] tls_engine = "stdlib"``); a handshake timeout so a stalled
    handshake frees its slot. Each connection starts on the hot route's protocol
    (``api/fastpath.py``), which hands anything else to aiohttp's handler (JSON answers to
    malformed HTTP included); stopping the site closes the connections still on the fast path."""

    __slots__ = ("_tls", "_handshake_timeout", "_observe", "_connections")

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, *,
                 tls_context: tls.ReloadableServerContext | ReloadableOpenSSLContext,
                 handshake_timeout: float, observe: Callable[[str], None]) -> None:
        super().__init__(runner, sock)
        self._tls = tls_context
        self._handshake_timeout = handshake_timeout
        self._observe = observe
        self._connections: FastPathConnections | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)
        assert isinstance(self._runner, web.AppRunner)
        loop = asyncio.get_running_loop()
        app = self._connections = FastPathConnections(self._runner.app[DEPS], protocol_factory(self._runner))
        if isinstance(self._tls, ReloadableOpenSSLContext):
            factory = tls_protocol_factory(self._tls, app, self._handshake_timeout, self._observe)
            self._server = await loop.create_server(factory, sock=self._sock, backlog=self._backlog)
        else:
            self._server = await loop.create_server(app, sock=self._sock, ssl=self._tls.context, backlog=self._backlog,
                                                    ssl_handshake_timeout=self._handshake_timeout)

    async def stop(self) -> None:
        await super().stop()
        if self._connections is not None:
            self._connections.close_all()  # aiohttp's shutdown closes the connections its handler owns


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise ConfigError([f"cannot listen on {host}:{port}: {exc.strerror or exc}"]) from None
    sock.setblocking(False)
    return sock


# The process is exiting: "retried" means by the next start, which reads the state dir.
_LEFT_QUEUED = "left queued in the state directory; the next start of the broker carries them out"


@dataclass
class Broker:
    config: Config
    clock: Clock
    metrics: Metrics
    audit: AuditLog
    store: StateStore
    vault: VaultClient
    auth: Authenticator
    cache: TokenCache
    revocations: RevocationQueue
    rotators: dict[str, Rotator]
    families: FamilyManager | None
    tls_context: tls.ReloadableServerContext | ReloadableOpenSSLContext
    api_port: int = 0
    ops_port: int = 0
    tls_reload_error: str | None = None
    shutdown_revoke_timeout: float = SHUTDOWN_REVOKE_TIMEOUT
    _runners: list[web.AppRunner] = field(default_factory=list)

    def reload(self) -> None:
        """SIGHUP: new certificates for new connections, and the audit log reopened at its path
        (logrotate's rename-and-create rotation). Nothing else of the config is applied."""
        self.reload_tls()
        self.audit.reopen()
        self._warn_if_config_changed()

    def _warn_if_config_changed(self) -> None:
        """An operator who narrowed an allow-list and sent SIGHUP must not believe it applies."""
        source = self.config.source
        if source is None:
            return
        try:
            changed = load_config(source) != self.config
        except ConfigError as exc:
            log.warning("config_not_reloaded path=%s reason=the file is not valid now (%s); SIGHUP applies only "
                        "certificates and the audit log; run broker check", source, "; ".join(exc.problems)[:300])
            return
        if changed:
            log.warning("config_not_reloaded path=%s reason=the file changed since the start; SIGHUP applies only "
                        "certificates and the audit log: restart the broker to apply it", source)

    def reload_tls(self) -> None:
        before = self.tls_context.crl
        try:
            self.tls_context.reload()
        except CertError as exc:
            # All or nothing: a CRL meant to revoke a leaked certificate is not in force either.
            log.error("tls_reload_failed error=%s action=keeping the previous certificate, client_ca and client_crl",
                      exc)
            self.tls_reload_error = f"the last reload (SIGHUP) failed, the previous certificate, client_ca and " \
                                    f"client_crl are in force: {exc}"
            self.metrics.tls_reloads.labels("failure").inc()
            return
        self.tls_reload_error = None
        self.metrics.tls_reloads.labels("success").inc()
        log.info("tls_reloaded cert=%s client_ca=%s", self.config.server.cert, self.config.server.client_ca)
        self.record_client_crl()
        crl = self.tls_context.crl
        if before is not None and crl is not None and (unrevoked := len(before.revoked - crl.revoked)):
            # A CRL's entries do not normally go away (a revoked certificate stays listed until
            # it expires): worth a look when one was put back by mistake.
            log.warning("client_crl_unrevoked count=%d path=%s reason=certificates the previous client_crl revoked "
                        "are not in the new one, so they are accepted again", unrevoked, crl.path)

    def record_client_crl(self) -> None:
        """The metric and a log line for the client_crl in force (at start, after each reload)."""
        crl = self.tls_context.crl
        self.metrics.client_crl_next_update.set((crl.next_update or 0) if crl is not None else 0)
        if crl is not None:
            log.info("client_crl path=%s revoked_certificates=%d next_update=%s", crl.path, len(crl.revoked),
                     rfc3339(crl.next_update) if crl.next_update is not None else "none")

    async def _start_listeners(self, api_sock: socket.socket, ops_sock: socket.socket) -> None:
        cfg = self.config
        self.record_client_crl()
        api = web.AppRunner(make_app(ApiDeps(
            profiles=cfg.profiles, admin_allow=cfg.admin.allow, cache=self.cache, rotators=self.rotators,
            audit=self.audit, metrics=self.metrics, clock=self.clock, max_body_bytes=cfg.server.max_body_bytes,
            rate_limiter=RateLimiter(cfg.server.rate_limit, cfg.server.rate_limit_burst)
            if cfg.server.rate_limit > 0 else None, families=self.families,
            revoked=self.tls_context.revokes if cfg.server.client_crl is not None else None,
        )), access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT)
        ops = web.AppRunner(make_ops_app(OpsDeps(
            cache=self.cache, metrics=self.metrics, clock=self.clock,
            audit_ok=lambda: self.audit.healthy, audit_required=cfg.audit.on_failure == "refuse",
            vault_status=lambda: (self.auth.authenticated, self.auth.last_error),
            state_error=lambda: self.revocations.state_error,
            per_job_profiles=tuple(name for name, p in cfg.profiles.items() if p.mode == "per-job"),
            family_state_error=lambda: self.families.state_error if self.families is not None else None,
            tls_error=lambda now: self.tls_context.crl.problem(now) if self.tls_context.crl is not None else None,
            tls_reload_error=lambda: self.tls_reload_error,
        )), access_log=None, handle_signals=False, shutdown_timeout=2.0)
        self.api_port = api_sock.getsockname()[1]
        self.ops_port = ops_sock.getsockname()[1]
        for runner in (api, ops):
            await runner.setup()
            self._runners.append(runner)
        await TLSSockSite(api, api_sock, tls_context=self.tls_context, handshake_timeout=cfg.server.handshake_timeout,
                          observe=self.metrics.count_handshake).start()
        await web.SockSite(ops, ops_sock).start()
        log.info("listening api=https://%s:%d ops=http://%s:%d", cfg.server.host, self.api_port,
                 cfg.ops.host, self.ops_port)

    async def _stop_listeners(self) -> None:
        # Reverse order of start; each cleanup stops accepting, then waits for in-flight requests.
        while self._runners:
            await self._runners.pop().cleanup()

    async def _retire_removed_profiles(self) -> None:
        """The last token of a shared profile that is no longer one (removed, renamed, made
        per-job) across a restart: nothing would ever retire it, so it is revoked now, like the
        families of a removed per-job profile (reason ``profile_removed``). Its record goes
        only once the revocation is queued on disk."""
        now = self.clock.now()
        retired = []
        for name, record in self.store.load_issued().items():
            if name in self.rotators:
                continue
            log.warning("profile_removed profile=%s generation=%d token_fp=%s action=its last token is revoked now",
                        name, record.generation, record.token_fp)
            try:
                if record.expires_at > now:
                    await self.revocations.schedule(PendingRevocation(
                        accessor=record.accessor, profile=name, generation=record.generation,
                        token_fp=record.token_fp, revoke_at=now, reason="profile_removed"))
            except OSError as exc:  # logged by the queue; the record stays, so the next start tries again
                log.error("profile_removed profile=%s error=%s action=not queued; retried at the next start",
                          name, exc.strerror or exc)
                continue
            retired.append(name)
        if retired:
            try:
                await self.store.forget_issued(retired)
            except OSError as exc:  # queued already; a later start finds the token revoked
                log.error("state_write_failed file=profiles.json error=%s", exc.strerror or exc)

    async def _revoke_everything(self) -> None:
        """Opt-in ([server] revoke_on_shutdown): nothing this broker handed out outlives it.

        Everything is queued (due now, on disk) before Vault is asked for anything, so a slow or
        unreachable Vault can delay none of it past the next start; then Vault gets
        ``shutdown_revoke_timeout`` for all of it, so that the stop fits a service manager's
        stop timeout (systemd's TimeoutStopSec) rather than being cut by SIGKILL."""
        # Families first: queueing them waits on nothing, while a rotator may wait for a rotation
        # that is waiting on Vault.
        ended = await self.families.queue_all("shutdown") if self.families is not None else []
        # At once, not one after another: each may wait SHUTDOWN_QUEUE_WAIT for a stalled
        # rotation, and a dozen profiles in a row would outlast the stop timeout.
        await asyncio.gather(*(rotator.queue_everything("shutdown", wait=SHUTDOWN_QUEUE_WAIT)
                               for rotator in self.rotators.values()))
        # Everything pending, too: revocations from before (a release Vault did not confirm, a
        # removed profile's token) and the grace windows of tokens no longer served.
        await self._revoke_within_deadline(await self.revocations.queue_all_now("shutdown"))
        if self.families is not None and ended:
            unconfirmed = Counter(e.family for e in self.revocations.pending if e.family is not None)
            self.families.record_ended(ended, "shutdown", unconfirmed)

    async def _revoke_within_deadline(self, due: list[PendingRevocation]) -> None:
        """Step two of the shutdown revocation: what Vault has not confirmed within
        ``shutdown_revoke_timeout`` stays queued for the next start, and the log says how much."""
        if not due:
            return
        try:
            async with asyncio.timeout(self.shutdown_revoke_timeout):
                await self.revocations.revoke_queued(due, "shutdown")
        except RevocationPending as exc:
            log.error("shutdown_revoke_failed error=%s action=%s", exc, _LEFT_QUEUED)
        except TimeoutError:
            left = len({e.accessor for e in due} & {e.accessor for e in self.revocations.pending})
            log.error("shutdown_revoke_failed error=%d of %d token(s) not confirmed revoked by Vault within %gs "
                      "action=%s", left, len(due), self.shutdown_revoke_timeout, _LEFT_QUEUED)

    async def run(self, stop: asyncio.Event, on_started: Callable[[Broker], None] | None = None) -> None:
        # Bound first: a second broker started on the same config by mistake fails here, before
        # it has touched the state files the running one owns.
        api_sock = bind(self.config.server.host, self.config.server.port)
        try:
            ops_sock = bind(self.config.ops.host, self.config.ops.port)
        except ConfigError:
            api_sock.close()
            raise
        try:
            self.audit.open()
            self.store.prepare()
            self.revocations.load()
            for rotator in self.rotators.values():
                await rotator.restore()
            await self._retire_removed_profiles()
            if self.families is not None:
                self.families.load()
        except BaseException:
            api_sock.close()
            ops_sock.close()
            raise
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.auth.run(), name="auth"),
                         group.create_task(self.revocations.run(), name="revocations")]
                tasks += [group.create_task(r.run(), name=f"rotator:{r.name}") for r in self.rotators.values()]
                if self.families is not None:
                    tasks.append(group.create_task(self.families.run(), name="families"))
                await self._start_listeners(api_sock, ops_sock)
                if on_started:
                    on_started(self)
                await stop.wait()
                log.info("shutdown listeners=stopping in_flight_timeout=%ss", SHUTDOWN_TIMEOUT)
                await self._stop_listeners()
                for task in tasks:
                    task.cancel()
            if self.config.server.revoke_on_shutdown:
                await self._revoke_everything()
            # Last, after anything above that still needed it: our own login ends with us rather
            # than at its TTL (unless it is the operator's token, which auth never revokes).
            await self.auth.logout(LOGOUT_TIMEOUT)
        finally:
            await self._stop_listeners()
            self.vault.close()
            self.audit.close()


def build(config: Config, clock: Clock | None = None, registry: CollectorRegistry | None = None,
          rng: random.Random | None = None) -> Broker:
    clock = clock or SystemClock()
    rng = rng or random.Random()
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    metrics.vault_authenticated.set(0)
    metrics.revocations_pending.set(0)
    for profile in config.profiles.values():
        # Series exist from the start at 0, so increase() and alerts see the first event.
        if profile.mode == "per-job":
            metrics.reuse_detected.labels(profile.name)
            continue  # no shared token, so no rotations: no series that would stay 0 for ever
        for outcome in ("success", "failure", "rolled_back"):
            metrics.rotations.labels(profile.name, outcome)
    audit = AuditLog(config.audit.path, clock, refuse_on_failure=config.audit.on_failure == "refuse")
    store = StateStore(config.state.dir)
    vcfg = config.vault
    vault = VaultClient(VaultClientConfig(address=vcfg.address, timeout=vcfg.timeout,
                                          ca_cert=str(vcfg.ca_cert) if vcfg.ca_cert else None), metrics)
    auth = Authenticator(vault, [method_from_config(a, config.state.dir) for a in vcfg.auth], clock, audit, metrics,
                         rng)
    cache = TokenCache()
    revocations = RevocationQueue(store, vault, auth, clock, audit, metrics, rng)
    rotators = {
        name: Rotator(profile, vault, auth, cache, revocations, store, clock, audit, metrics, rng)
        for name, profile in config.profiles.items() if profile.mode == "shared"
    }
    # Family starts and refreshes are driven by jobs, so they come in bursts; on a lane of their
    # own they cannot take the threads that rotations, checks, logins and revocations need (its
    # threads start with the first call). Made even with no per-job profile: families.json may
    # still hold families of one removed across a restart, which then end (profile_removed).
    families = FamilyManager(config.profiles, vault.lane("vault-families", FAMILY_VAULT_WORKERS), auth, revocations,
                             store, clock, audit, metrics)
    return Broker(config=config, clock=clock, metrics=metrics, audit=audit, store=store, vault=vault, auth=auth,
                  cache=cache, revocations=revocations, rotators=rotators, families=families,
                  tls_context=listener_context(config.server))


def stuck_vault_calls(wait: float = 1.0) -> list[str]:
    """After the event loop has stopped: the names of Vault worker threads still inside a call
    ``wait`` seconds later (requests bounds each socket read, not a whole answer, so a Vault
    that trickles bytes keeps one busy indefinitely). Python would wait for them at exit, past
    systemd's TimeoutStopSec; the caller exits without them. Any other thread still running
    (a state-file write) is waited for as usual: then this returns []."""
    import threading
    import time

    deadline = time.monotonic() + wait
    stuck = []
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            stuck.append(thread.name)
    if any(not name.startswith(WORKER_THREAD_PREFIX) for name in stuck):
        return []
    return stuck


SWITCH_INTERVAL = 0.0005  # seconds; CPython's default is 5 ms


def tune_interpreter() -> None:
    """Vault calls run on threads (hvac is blocking) and hold the GIL while requests and json
    do their Python work; by default a thread keeps it for up to 5 ms, and every fetch waiting
    on the event loop waits that long. bench/ showed exactly those spikes at each rotation."""
    import sys

    sys.setswitchinterval(SWITCH_INTERVAL)
    raise_open_files_limit()


# Enough for any runner host's jobs; a hard limit of "unlimited" is not taken literally.
OPEN_FILES_WANTED = 1 << 16


def raise_open_files_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (at most OPEN_FILES_WANTED), as Go programs do at
    start: each client connection is a descriptor, the usual soft limit is 1024 (systemd's
    default too), and a listener out of descriptors refuses connections without a log line.
    Returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("open_files_limit_unchanged soft=%d hard=%d error=%s", soft, hard, exc)
            return soft, soft
        log.info("open_files_limit soft=%d (was %d) hard=%d", wanted, soft, hard)
        return soft, wanted
    return soft, soft


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency everywhere but Windows
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve_until_signalled(broker: Broker, on_started: Callable[[Broker], None] | None = None) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the TLS certificate and client CA and reopens
    the audit log."""
    tune_interpreter()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, broker.reload)
    try:
        await broker.run(stop, on_started)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
