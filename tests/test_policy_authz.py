"""Pure rules, no I/O: rotation timing (broker/tokens/policy.py) and who may do what
(broker/api/authz.py). DESIGN §6 (jittered rotation, backoff never past expiry) and §3
(deny by default, admin allow-list)."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator

import pytest

from broker.api.authz import is_admin, matching_identity, may_fetch
from broker.config import ROTATION_JITTER
from broker.tokens import policy
from broker.tokens.model import Token

JITTERS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999999]


def token(issued_at: float = 1000.0, ttl: float = 3600.0, rotate_at: float | None = None,
          generation: int = 1) -> Token:
    return Token(value="s.not-a-real-token", accessor="acc", generation=generation, issued_at=issued_at,
                 expires_at=issued_at + ttl, rotate_at=rotate_at if rotate_at is not None else issued_at + ttl / 2)


# --- rotate_at ----------------------------------------------------------------------------------

def test_jitter_is_ten_percent() -> None:
    assert ROTATION_JITTER == pytest.approx(0.1)


@pytest.mark.parametrize("jitter", JITTERS)
def test_rotate_at_stays_within_ten_percent_of_rotate_after(jitter: float) -> None:
    at = policy.rotate_at(1000.0, 4600.0, ttl=3600.0, rotate_after=2400.0, jitter=jitter)
    assert 1000.0 + 2400.0 * 0.9 <= at < 1000.0 + 2400.0 * 1.1


def test_rotate_at_jitter_ends_and_middle() -> None:
    def rotate(jitter: float) -> float:
        return policy.rotate_at(0.0, 3600.0, ttl=3600.0, rotate_after=2400.0, jitter=jitter)

    assert rotate(0.0) == pytest.approx(2160.0)  # -10 %
    assert rotate(0.5) == pytest.approx(2400.0)  # no jitter
    assert rotate(1.0) == pytest.approx(2640.0)  # +10 % (the open end of [0, 1))
    values = [rotate(j) for j in JITTERS]
    assert values == sorted(values), "more jitter, later rotation"


def test_rotate_at_counts_from_issue_time() -> None:
    assert policy.rotate_at(5000.0, 8600.0, 3600.0, 2400.0, 0.5) == pytest.approx(7400.0)


@pytest.mark.parametrize("jitter", JITTERS)
def test_rotate_at_scales_when_vault_grants_a_shorter_ttl(jitter: float) -> None:
    # Asked for 1h, a role max_ttl granted 30m: rotate at the same fraction (2/3) of what was granted.
    at = policy.rotate_at(0.0, 1800.0, ttl=3600.0, rotate_after=2400.0, jitter=jitter)
    assert 1200.0 * 0.9 <= at < 1200.0 * 1.1
    assert at < 1800.0, "rotation must come before the granted expiry"


def test_rotate_at_scaled_without_jitter_is_the_same_fraction() -> None:
    assert policy.rotate_at(100.0, 100.0 + 9.0, ttl=30.0, rotate_after=20.0, jitter=0.5) == pytest.approx(106.0)


def test_rotate_at_does_not_stretch_when_vault_grants_more() -> None:
    assert policy.rotate_at(0.0, 7200.0, ttl=3600.0, rotate_after=2400.0, jitter=0.5) == pytest.approx(2400.0)


def test_rotate_at_with_zero_ttl_does_not_divide_by_zero() -> None:
    assert policy.rotate_at(0.0, 10.0, ttl=0.0, rotate_after=5.0, jitter=0.5) == pytest.approx(5.0)


# --- should_rotate, is_servable -------------------------------------------------------------------

def test_should_rotate_with_no_token() -> None:
    assert policy.should_rotate(0.0, None)


@pytest.mark.parametrize(("now", "expected"), [(1000.0, False), (2999.999, False), (3000.0, True), (3001.0, True),
                                               (99999.0, True)])
def test_should_rotate_from_rotate_at_on(now: float, expected: bool) -> None:
    assert policy.should_rotate(now, token(rotate_at=3000.0)) is expected


def test_nothing_to_serve_without_a_token() -> None:
    assert not policy.is_servable(0.0, None)
    assert not policy.is_servable(0.0, None, min_ttl=0.0)


@pytest.mark.parametrize(("left", "expected"), [(3600.0, True), (1.0, True), (0.999, False), (0.0, False),
                                                (-5.0, False)])
def test_is_servable_keeps_a_one_second_margin(left: float, expected: bool) -> None:
    t = token(issued_at=0.0, ttl=3600.0)
    assert policy.is_servable(t.expires_at - left, t) is expected


@pytest.mark.parametrize(("left", "min_ttl", "expected"), [
    (10.0, 10.0, True), (9.99, 10.0, False), (600.0, 300.0, True), (299.0, 300.0, False),
    (1.0, 0.5, True),  # a min_ttl under the margin does not lower the margin
    (0.9, 0.5, False),
])
def test_is_servable_with_min_ttl(left: float, min_ttl: float, expected: bool) -> None:
    t = token(issued_at=0.0, ttl=3600.0)
    assert policy.is_servable(t.expires_at - left, t, min_ttl) is expected


def test_max_min_ttl_is_what_a_fresh_token_can_give() -> None:
    assert policy.max_min_ttl(30.0) == pytest.approx(29.0)
    assert policy.max_min_ttl(3600.0) == pytest.approx(3599.0)
    fresh = token(issued_at=50.0, ttl=30.0)
    # The largest allowed min_ttl is still met by a token minted a moment (a verify round trip) ago...
    assert policy.is_servable(50.9, fresh, policy.max_min_ttl(30.0))
    # ...while more than the TTL itself can never be met, however fresh the token.
    assert not policy.is_servable(50.0, fresh, 30.5)


# --- backoff ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("failures", [1, 2, 3, 5, 8, 9, 10, 12, 20, 50])
@pytest.mark.parametrize("jitter", JITTERS)
def test_backoff_is_full_jitter_within_the_exponential_ceiling(failures: int, jitter: float) -> None:
    ceiling = min(300.0, 2.0 ** (failures - 1))
    delay = policy.backoff_delay(failures, jitter, now=0.0, current=None)
    assert policy.MIN_RETRY_DELAY <= delay <= ceiling
    assert delay == pytest.approx(max(policy.MIN_RETRY_DELAY, jitter * ceiling))


@pytest.mark.parametrize(("failures", "ceiling"), [(1, 1.0), (2, 2.0), (3, 4.0), (9, 256.0), (10, 300.0),
                                                   (30, 300.0)])
def test_backoff_ceiling_doubles_from_one_second_to_five_minutes(failures: int, ceiling: float) -> None:
    assert policy.backoff_delay(failures, 0.9999999, 0.0, None) == pytest.approx(ceiling, rel=1e-6)


def test_backoff_treats_zero_failures_like_one() -> None:
    assert policy.backoff_delay(0, 0.5, 0.0, None) == pytest.approx(0.5)


def test_backoff_has_a_floor_so_it_never_spins() -> None:
    assert policy.backoff_delay(1, 0.0, 0.0, None) == policy.MIN_RETRY_DELAY == pytest.approx(0.05)
    assert policy.backoff_delay(15, 0.0, 0.0, None) == pytest.approx(0.05)


@pytest.mark.parametrize("jitter", JITTERS)
def test_backoff_never_sleeps_past_the_current_tokens_expiry(jitter: float) -> None:
    current = token(issued_at=0.0, ttl=100.0)  # expires at 100
    now = 97.0
    delay = policy.backoff_delay(12, jitter, now, current)
    assert delay <= 3.0 + 1e-9
    assert delay == pytest.approx(max(0.05, min(jitter * 300.0, 3.0)))


def test_backoff_ignores_an_already_expired_token() -> None:
    expired = token(issued_at=0.0, ttl=100.0)
    assert policy.backoff_delay(5, 0.5, 150.0, expired) == pytest.approx(8.0)


def test_backoff_keeps_the_floor_even_right_before_expiry() -> None:
    current = token(issued_at=0.0, ttl=100.0)
    assert policy.backoff_delay(5, 0.5, 99.99, current) == pytest.approx(0.05)


def test_backoff_survives_a_very_long_outage() -> None:
    assert policy.backoff_delay(5000, 0.5, 0.0, None) == pytest.approx(150.0)


# --- grace and scheduling -----------------------------------------------------------------------------

def test_grace_until_is_rotation_plus_grace_or_the_previous_expiry() -> None:
    previous = token(issued_at=0.0, ttl=100.0)
    assert policy.grace_until(60.0, 15.0, previous) == pytest.approx(75.0)
    assert policy.grace_until(90.0, 15.0, previous) == pytest.approx(100.0)


def test_check_due_at_skips_a_missing_or_expired_token() -> None:
    current = token(issued_at=0.0, ttl=1000.0)
    assert policy.check_due_at(100.0, current, 700.0) == 700.0
    assert policy.check_due_at(999.9, current, 700.0) == 700.0
    assert policy.check_due_at(1000.0, current, 700.0) == math.inf, "expired: nothing to ask Vault about"
    assert policy.check_due_at(100.0, None, 700.0) == math.inf


def test_rotation_due_at() -> None:
    current = token(rotate_at=500.0)
    assert policy.rotation_due_at(100.0, current, None) == 500.0
    assert policy.rotation_due_at(100.0, current, 120.0) == 120.0, "after a failure the backoff decides"
    assert policy.rotation_due_at(100.0, None, None) == 100.0, "nothing to serve: now"
    assert policy.rotation_due_at(100.0, None, 130.0) == 130.0


# --- authz: deny by default, first matching identity, admin ---------------------------------------------

JOB = ("cn:job", "uri:spiffe://ci.example/runner/1")


def test_matching_identity_follows_the_callers_identity_order_not_the_patterns() -> None:
    patterns = ["uri:spiffe://ci.example/runner/*", "cn:job"]
    assert matching_identity(JOB, patterns) == "cn:job"
    assert matching_identity(tuple(reversed(JOB)), patterns) == "uri:spiffe://ci.example/runner/1"


def test_matching_identity_picks_the_identity_that_a_pattern_grants() -> None:
    assert matching_identity(JOB, ["uri:spiffe://ci.example/runner/*"]) == "uri:spiffe://ci.example/runner/1"
    assert matching_identity(JOB, ["cn:nobody", "uri:spiffe://ci.example/runner/1"]) == JOB[1]


def _once(items: list[str]) -> Iterator[str]:
    yield from items


def test_patterns_given_as_a_one_shot_iterator_still_match_a_later_identity() -> None:
    assert matching_identity(JOB, _once(["uri:spiffe://ci.example/*"])) == JOB[1]
    assert may_fetch(JOB, _once(["uri:spiffe://ci.example/*"]))
    assert is_admin(JOB, _once(["uri:spiffe://ci.example/*"]))


@pytest.mark.parametrize("patterns", [
    [],  # deny by default
    ["cn:job-*"],  # globs are anchored: "cn:job" is not "cn:job-…"
    ["cn:Job"],  # case-sensitive
    ["cn:jo"],
    ["uri:*runner/2"],
    ["dns:job"],  # the kind must match
    ["uri:cn:job"],
    ["job"], ["*"], [":*"], [""], ["cn"],  # malformed patterns grant nothing
    ["*:*"],  # the kind is literal, not a glob
])
def test_denied_unless_a_pattern_matches(patterns: list[str]) -> None:
    assert matching_identity(JOB, patterns) is None
    assert not may_fetch(JOB, patterns)
    assert not is_admin(JOB, patterns)


@pytest.mark.parametrize("identities", [(), ("",), ("job",), ("cn",)])
def test_no_usable_identity_is_denied_even_for_catch_all_patterns(identities: tuple[str, ...]) -> None:
    assert matching_identity(identities, ["cn:*", "uri:*", "dns:*"]) is None


@pytest.mark.parametrize(("pattern", "identity"), [
    ("cn:*", "cn:anything"),
    ("cn:job", "cn:job"),
    ("cn:job-*", "cn:job-42"),
    ("cn:runner-?", "cn:runner-7"),
    ("dns:*.ci.example", "dns:host1.ci.example"),
    ("uri:spiffe://ci.example/runner/*", "uri:spiffe://ci.example/runner/1/nested"),  # documented: * matches /
])
def test_allowed_when_a_pattern_matches(pattern: str, identity: str) -> None:
    assert matching_identity(("cn:other", identity), [pattern]) == (identity if pattern != "cn:*" else "cn:other")
    assert may_fetch((identity,), [pattern])


def test_a_cn_glob_never_matches_a_uri_identity() -> None:
    assert matching_identity(("uri:spiffe://x/job",), ["cn:*"]) is None
    assert matching_identity(("cn:spiffe://x/job",), ["uri:*"]) is None


@pytest.mark.parametrize(("identities", "admin_allow", "expected"), [
    (("cn:ops",), ("cn:ops",), True),
    (("cn:ops-1",), ("cn:ops-*",), True),
    (("cn:ops",), ("cn:ops-*",), False),
    (("cn:job", "uri:spiffe://ci.example/ops"), ("uri:spiffe://ci.example/ops",), True),
    (("cn:ops",), (), False),  # no admin allow-list: nobody is admin
    ((), ("cn:*",), False),
    (("cn:opsx",), ("cn:ops",), False),
])
def test_is_admin(identities: tuple[str, ...], admin_allow: tuple[str, ...], expected: bool) -> None:
    assert is_admin(identities, admin_allow) is expected


def test_admin_and_fetch_rights_are_independent() -> None:
    ops = ("cn:ops",)
    assert is_admin(ops, ["cn:ops"]) and not may_fetch(ops, ["cn:job"])
    assert may_fetch(JOB, ["cn:job"]) and not is_admin(JOB, ["cn:ops"])


# --- purity -----------------------------------------------------------------------------------------------

def test_pure_modules_import_no_io_frameworks() -> None:
    """DESIGN §2: policy, identity and authz import no aiohttp, hvac or prometheus_client."""
    code = ("import sys, broker.tokens.policy, broker.identity, broker.api.authz; "
            "print(sorted(m for m in ('aiohttp', 'hvac', 'prometheus_client') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.strip() == "[]"


def test_backoff_never_sleeps_past_the_last_chance_to_replace_a_token_still_served() -> None:
    """Serving stops SERVE_MARGIN before expiry: a retry due at expiry came after the 503s."""
    token = _backoff_token(expires_at=100.0)
    last_chance = 100.0 - policy.SERVE_MARGIN - policy.LAST_CHANCE_LEAD
    assert policy.backoff_delay(10, 1.0, 50.0, token) == last_chance - 50.0
    assert policy.backoff_delay(10, 1.0, last_chance - 0.01, token) == pytest.approx(policy.MIN_RETRY_DELAY)
    # Past the last chance, still served: the old bound (never past expiry) applies.
    assert policy.backoff_delay(10, 1.0, 98.0, token) == 2.0
    assert policy.backoff_delay(1, 0.1, 50.0, token) == pytest.approx(0.1)  # a short backoff is left alone


def _backoff_token(expires_at: float) -> Token:
    return Token(value="v", accessor="a", generation=1, issued_at=0.0, expires_at=expires_at, rotate_at=60.0)


def test_backoff_honours_its_cap_and_retry_cap_follows_check_interval() -> None:
    assert policy.backoff_delay(12, 0.9999999, 0.0, None, cap=60.0) == pytest.approx(60.0, rel=1e-6)
    assert policy.retry_cap(60.0) == 60.0
    assert policy.retry_cap(0.2) == policy.BACKOFF_BASE
    assert policy.retry_cap(3600.0) == policy.BACKOFF_CAP
