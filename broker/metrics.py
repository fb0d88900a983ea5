"""Every metric of DESIGN §7, registered on an injected registry (never the global one).

Rotator, API and Vault client record here; only ``ops/`` exposes the registry.
No label ever carries a token: labels are profile names, slots, routes, operations, outcomes.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.token_requests = Counter(
            "broker_token_requests", "Token fetches by profile and outcome.",
            ["profile", "outcome"], registry=registry,
        )
        self.request_duration = Histogram(
            "broker_request_duration_seconds", "Time to answer an API request, by route.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.rotations = Counter(
            "broker_rotations", "Rotation attempts by outcome (success, failure, rolled_back).",
            ["profile", "outcome"], registry=registry,
        )
        self.token_expiry = Gauge(
            "broker_token_expiry_timestamp_seconds", "Unix time at which the token in a slot expires.",
            ["profile", "slot"], registry=registry,
        )
        self.token_generation = Gauge(
            "broker_token_generation", "Generation of the current token.", ["profile"], registry=registry,
        )
        self.consecutive_failures = Gauge(
            "broker_rotation_consecutive_failures",
            "Consecutive failed Vault operations (rotation or check) for the profile.",
            ["profile"], registry=registry,
        )
        self.vault_requests = Counter(
            "broker_vault_requests", "Requests to Vault by operation and outcome.",
            ["operation", "outcome"], registry=registry,
        )
        self.vault_duration = Histogram(
            "broker_vault_request_duration_seconds", "Vault request latency by operation.",
            ["operation"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.vault_authenticated = Gauge(
            "broker_vault_authenticated", "1 while the broker holds a valid Vault login.", registry=registry,
        )
        self.reuse_detected = Counter(
            "broker_token_reuse_detected", "Refresh-token reuse detections (family revoked).",
            ["profile"], registry=registry,
        )
        self.tls_handshakes = Counter(
            "broker_tls_handshakes", "TLS handshakes on the API listener (openssl engine) by outcome.",
            ["outcome"], registry=registry,
        )
        self.tls_reloads = Counter(
            "broker_tls_reloads", "SIGHUP reloads of the listener's certificate, client_ca and client_crl, by outcome.",
            ["outcome"], registry=registry,
        )
        for outcome in ("success", "failure"):  # present from the start: an alert can see the first failure
            self.tls_reloads.labels(outcome)
        self.client_crl_next_update = Gauge(
            "broker_client_crl_next_update_timestamp_seconds",
            "Unix time after which the loaded client_crl is stale and every client is refused (0: none).",
            registry=registry,
        )
        self.revocations_pending = Gauge(
            "broker_revocations_pending", "Token revocations scheduled but not yet done.", registry=registry,
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        """The labelled child, looked up in prometheus_client (a lock and a dict) once, not per
        event: these are counted on every fetch and every handshake."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def count_request(self, profile: str, outcome: str) -> None:
        self._child(self.token_requests, profile, outcome).inc()

    def observe_request(self, route: str, seconds: float) -> None:
        self._child(self.request_duration, route).observe(seconds)

    def count_handshake(self, outcome: str) -> None:
        self._child(self.tls_handshakes, outcome).inc()

    def record_state(self, profile: str, current_expires: float | None, previous_expires: float | None,
                     generation: int, failures: int) -> None:
        """Mirror a profile's state into the gauges; a missing slot reads 0 (nothing to expire)."""
        self.token_expiry.labels(profile, "current").set(current_expires or 0)
        self.token_expiry.labels(profile, "previous").set(previous_expires or 0)
        self.token_generation.labels(profile).set(generation)
        self.consecutive_failures.labels(profile).set(failures)
