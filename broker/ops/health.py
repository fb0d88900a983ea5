"""Liveness and readiness from component state (pure: no I/O, no clock reads)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from broker.audit import rfc3339
from broker.tokens import policy
from broker.tokens.model import ProfileState


@dataclass(frozen=True)
class Readiness:
    ready: bool
    details: dict[str, object]


def profile_report(now: float, state: ProfileState) -> dict[str, object]:
    current = state.current
    reasons = []
    if not policy.is_servable(now, current):
        reasons.append("no valid current token")
    if state.unhealthy:
        reasons.append(f"{state.consecutive_failures} consecutive failures: {state.last_error}")
    return {
        "ready": not reasons,
        "generation": state.generation,
        "expires_at": rfc3339(current.expires_at) if current else None,
        "rotates_at": rfc3339(current.rotate_at) if current else None,
        "consecutive_failures": state.consecutive_failures,
        "reasons": reasons,
    }


def per_job_report(vault_authenticated: bool, vault_error: str | None,
                   family_state_error: str | None = None) -> dict[str, object]:
    """A per-job profile holds no token between jobs; it can serve while the broker holds a
    Vault login to mint with and can record the families it starts."""
    reasons = [] if vault_authenticated else [f"no Vault login to mint with: {vault_error or 'not logged in yet'}"]
    if family_state_error is not None:
        reasons.append(family_state_error)
    return {"ready": not reasons, "mode": "per-job", "reasons": reasons}


def readiness(now: float, states: Iterable[ProfileState], audit_ok: bool, vault_authenticated: bool,
              vault_error: str | None, audit_required: bool = True, state_error: str | None = None,
              per_job: Iterable[str] = (), family_state_error: str | None = None,
              tls_error: str | None = None, tls_reload_error: str | None = None) -> Readiness:
    """``audit_required`` false ([audit] on_failure = "continue"): a failing audit log is
    reported but does not make the broker unready, since it keeps serving.

    ``state_error`` (the revocation queue cannot be written to the state dir) is reported but
    does not make the broker unready: every token served is still valid and every pending
    revocation is still carried out from memory; only a restart before the disk recovers would
    forget some. Taking a serving broker out of rotation would not fix the disk, and a disk that
    stays broken makes rotations fail (profiles.json cannot be written either), which does turn
    the profiles unhealthy after their alert_threshold.

    ``family_state_error`` (families.json cannot be written) makes per-job profiles unready:
    no family can start or refresh then, every such request is refused.

    ``tls_error`` (the client_crl is past its nextUpdate: every handshake is refused) makes
    the broker unready: no job can connect. ``tls_reload_error`` (the last SIGHUP could not
    load the files: the previous certificate, client_ca and client_crl stay in force) is only
    reported: the broker serves as before, but a revocation meant to apply did not."""
    profiles = {s.name: profile_report(now, s) for s in states}
    profiles.update({name: per_job_report(vault_authenticated, vault_error, family_state_error)
                     for name in per_job})
    problems = [f"profile {name}: {'; '.join(r['reasons'])}"  # type: ignore[arg-type]
                for name, r in profiles.items() if not r["ready"]]
    if not audit_ok and audit_required:
        problems.append("audit log cannot be written")
    if tls_error is not None:
        problems.append(tls_error)
    return Readiness(
        ready=not problems,
        details={
            "ready": not problems,
            "problems": problems,
            "profiles": profiles,
            "audit": "ok" if audit_ok else "failing",
            "state": {"ok": state_error is None and family_state_error is None,
                      "last_error": state_error or family_state_error},
            "vault": {"authenticated": vault_authenticated, "last_error": vault_error},
            "tls": {"ok": tls_error is None, "last_error": tls_error, "reload_error": tls_reload_error},
        },
    )
