"""The reuse-detection rule as a pure function (DESIGN §6, per-job rules 2 and 3)."""

from __future__ import annotations

import pytest

from broker.tokens import families as families_module
from broker.tokens.families import (Family, Issued, LiveToken, Verdict, family_of, judge, new_refresh_token,
                                   refresh_hash)
from broker.tokens.model import Token

OWNER, OTHER = "a" * 64, "b" * 64


def family(**changes: object) -> Family:
    base = dict(id="fam_x", profile="deploy", owner_fp=OWNER, owner_identity="cn:job", created_at=0.0,
                expires_at=1000.0, generation=3, current=LiveToken("acc", 3, "fp", 100.0),
                current_hash="h3", previous_hash="h2", previous_spent_at=50.0, spent_hashes=("h1",))
    base.update(changes)
    return Family(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("presented", "caller", "now", "verdict"), [
    ("h3", OWNER, 60.0, Verdict.REFRESH),
    ("h3", OTHER, 60.0, Verdict.REUSE),  # a live token from another certificate
    ("h2", OWNER, 60.0, Verdict.RETRY),  # previous, same cert, 10 s after it was spent
    ("h2", OWNER, 80.0, Verdict.RETRY),  # exactly at the interval's end
    ("h2", OWNER, 80.1, Verdict.REUSE),  # after the interval
    ("h2", OTHER, 60.0, Verdict.REUSE),  # previous from another certificate
    ("h1", OWNER, 51.0, Verdict.REUSE),  # an older generation, however soon
    ("nope", OWNER, 60.0, Verdict.INVALID),
    ("nope", OTHER, 60.0, Verdict.INVALID),  # guessing never revokes anything
])
def test_judge(presented: str, caller: str, now: float, verdict: Verdict) -> None:
    assert judge(family(), presented, caller, now, reuse_interval=30.0) is verdict


def test_reuse_interval_zero_makes_every_replay_reuse() -> None:
    assert judge(family(), "h2", OWNER, 50.0, reuse_interval=0.0) is Verdict.RETRY  # the same instant
    assert judge(family(), "h2", OWNER, 50.001, reuse_interval=0.0) is Verdict.REUSE


def test_first_generation_has_no_previous() -> None:
    first = family(generation=1, previous_hash=None, previous_spent_at=None, spent_hashes=())
    assert judge(first, "h3", OWNER, 1.0, 30.0) is Verdict.REFRESH
    assert judge(first, "h2", OWNER, 1.0, 30.0) is Verdict.INVALID


def test_refresh_tokens_are_random_opaque_and_carry_their_family() -> None:
    tokens = {new_refresh_token("fam_x") for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert family_of(token) == "fam_x" and len(token.partition(".")[2]) >= 43  # 256 bits, URL-safe
        assert len(refresh_hash(token)) == 64


def test_issued_and_live_token_reprs_hide_every_secret() -> None:
    secret, refresh, accessor = "s.SuperSecretTokenValue1234567890", "fam_x.REFRESHsecretREFRESHsecret", "acc-SECRET"
    token = Token(value=secret, accessor=accessor, generation=1, issued_at=0, expires_at=10, rotate_at=5)
    live = LiveToken.of(token)
    family = Family(id="fam_x", profile="p", owner_fp="o", owner_identity="cn:j", created_at=0, expires_at=9,
                    generation=1, current=live, current_hash=families_module.refresh_hash(refresh))
    for obj in (live, family, Issued(family, token, refresh)):
        text = repr(obj) + str(obj)
        assert secret not in text and refresh not in text and accessor not in text
        assert families_module.refresh_hash(refresh) not in text
