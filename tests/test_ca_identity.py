"""SPIFFE identity parsing/formatting, serial normalisation, rotation policy and the
backoff schedule: pure functions, checked exhaustively and with hypothesis."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smc.ca import (
    Backoff,
    InvalidIdentity,
    InvalidRotationPolicy,
    InvalidSerial,
    RotationPolicy,
    SpiffeId,
    due_for_renewal,
    format_spiffe_id,
    normalize_serial,
    parse_spiffe_id,
    renew_at,
    serial_to_colon_hex,
)


def test_parse_and_format_roundtrip() -> None:
    sid = parse_spiffe_id("spiffe://cluster.local/ns/default/sa/web-1.v2")
    assert sid == SpiffeId(
        trust_domain="cluster.local", namespace="default", service_account="web-1.v2"
    )
    assert str(sid) == sid.uri == "spiffe://cluster.local/ns/default/sa/web-1.v2"
    assert (
        format_spiffe_id(trust_domain="td", namespace="a", service_account="b")
        == "spiffe://td/ns/a/sa/b"
    )


@pytest.mark.parametrize(
    ("value", "part"),
    [
        ("http://td/ns/a/sa/b", "scheme"),
        ("SPIFFE://td/ns/a/sa/b", "scheme"),
        ("spiffe:///ns/a/sa/b", "trust-domain"),
        ("spiffe://TD/ns/a/sa/b", "trust-domain"),
        ("spiffe://td:8080/ns/a/sa/b", "trust-domain"),
        ("spiffe://user@td/ns/a/sa/b", "trust-domain"),
        ("spiffe://td", "path"),
        ("spiffe://td/", "path"),
        ("spiffe://td/ns/a/sa/b/", "path"),
        ("spiffe://td/ns//sa/b", "path"),
        ("spiffe://td/ns/../sa/b", "path"),
        ("spiffe://td/namespace/a/sa/b", "path"),
        ("spiffe://td/ns/a/sa", "path"),
        ("spiffe://td/ns/a/sa/b?x=1", "query"),
        ("spiffe://td/ns/a/sa/b#f", "fragment"),
        ("spiffe://td/ns/-a/sa/b", "namespace"),
        ("spiffe://td/ns/A/sa/b", "namespace"),
        ("spiffe://td/ns/" + "a" * 64 + "/sa/b", "namespace"),
        ("spiffe://td/ns/a/sa/b_c", "service-account"),
        ("spiffe://td/ns/a/sa/b.", "service-account"),
        ("spiffe://td/ns/a/sa/b..c", "service-account"),
    ],
)
def test_invalid_identities_name_the_bad_part(value: str, part: str) -> None:
    with pytest.raises(InvalidIdentity) as info:
        parse_spiffe_id(value)
    assert info.value.part == part
    assert part in str(info.value) and value[:20] in str(info.value)


def test_trust_domain_enforced() -> None:
    with pytest.raises(InvalidIdentity, match="not the issuer's trust domain"):
        parse_spiffe_id("spiffe://a.td/ns/x/sa/y", trust_domain="b.td")
    with pytest.raises(InvalidIdentity, match="namespace"):
        SpiffeId.of(trust_domain="td", namespace="", service_account="x")


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


@given(td=st.from_regex(r"[a-z0-9._-]{1,30}", fullmatch=True), ns=_label, sa=_label)
def test_roundtrip_property(td: str, ns: str, sa: str) -> None:
    uri = format_spiffe_id(trust_domain=td, namespace=ns, service_account=sa)
    assert parse_spiffe_id(uri, trust_domain=td).uri == uri


def test_serial_normalisation() -> None:
    assert normalize_serial("00:B4:d5") == "b4d5"
    assert normalize_serial("000b4d5") == "b4d5"
    assert normalize_serial("1") == "01"
    assert normalize_serial("b4d5") == "b4d5"
    assert normalize_serial("4d5") == "04d5"
    assert serial_to_colon_hex("4d5") == "04:d5"
    for bad in ("", "xyz", "12:zz", "a" * 81):
        with pytest.raises(InvalidSerial):
            normalize_serial(bad)


NB = datetime(2026, 1, 1, tzinfo=UTC)
NA = NB + timedelta(hours=24)


def test_renew_at_is_deterministic_and_within_jitter() -> None:
    seen = set()
    for i in range(200):
        seed = f"spiffe://td/ns/a/sa/s{i}"
        t = renew_at(not_before=NB, not_after=NA, seed=seed)
        assert t == renew_at(not_before=NB, not_after=NA, seed=seed)  # replicas agree
        frac = (t - NB) / (NA - NB)
        assert 2 / 3 - 0.05 <= frac < 2 / 3 + 0.05
        seen.add(t)
    assert len(seen) > 150  # identities spread out
    no_jitter = renew_at(not_before=NB, not_after=NA, seed="x", jitter=0.0)
    assert no_jitter == NB + timedelta(hours=16)


def test_due_for_renewal() -> None:
    t = renew_at(not_before=NB, not_after=NA, seed="s")
    assert not due_for_renewal(not_before=NB, not_after=NA, now=t - timedelta(seconds=1), seed="s")
    assert due_for_renewal(not_before=NB, not_after=NA, now=t, seed="s")
    assert due_for_renewal(not_before=NB, not_after=NA, now=NA + timedelta(days=1), seed="s")


@pytest.mark.parametrize(
    ("fraction", "jitter", "field"),
    [
        (0.0, 0.0, "fraction"),
        (1.0, 0.0, "fraction"),
        (0.5, 0.5, "jitter"),
        (0.9, 0.2, "jitter"),
        (0.5, -0.1, "jitter"),
    ],
)
def test_policy_validation(fraction: float, jitter: float, field: str) -> None:
    with pytest.raises(InvalidRotationPolicy, match=field):
        renew_at(not_before=NB, not_after=NA, seed="s", fraction=fraction, jitter=jitter)
    with pytest.raises(InvalidRotationPolicy, match=field):
        RotationPolicy(fraction=fraction, jitter=jitter)
    with pytest.raises(InvalidRotationPolicy, match="not_after"):
        renew_at(not_before=NA, not_after=NB, seed="s")


def test_backoff_schedule_grows_and_is_bounded() -> None:
    b = Backoff(attempts=8, initial=0.1, multiplier=2.0, maximum=1.0, jitter=0.5)
    delays = list(b.delays(rng=random.Random(1)))
    assert len(delays) == 7
    for n, d in enumerate(delays):
        cap = min(1.0, 0.1 * 2**n)
        assert cap * 0.5 <= d <= cap
    with pytest.raises(InvalidRotationPolicy, match=r"Backoff\.attempts"):
        Backoff(attempts=0)
    with pytest.raises(InvalidRotationPolicy, match=r"Backoff\.jitter"):
        Backoff(jitter=2)
