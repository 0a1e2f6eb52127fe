"""Parsing of split.smi-spec.io TrafficSplit (v1alpha1-4): backends and their weights.

Role: the parser :mod:`smc.smi._parse` dispatches to for kind ``TrafficSplit``; it reads weights
written as integers or Kubernetes quantities and scales them to whole numbers exactly.
Concurrency: pure functions over their arguments; safe everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fractions import Fraction

from smc.smi._model import (
    Backend,
    RouteRef,
    TrafficSplit,
)
from smc.smi._reader import SPECS, _Abort, _body, _idx, _join, _Reader, _type_name

_QUANTITY = re.compile(
    r"^([+-]?)(\d+(?:\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$"
)


_QUANTITY_SUFFIX: dict[str, Fraction] = {
    "": Fraction(1),
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 1000),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
}


_MAX_WEIGHT = 2**31 - 1


def _traffic_split(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> TrafficSplit:
    allowed: tuple[str, ...] = ("service", "backends")
    if version in ("v1alpha3", "v1alpha4"):
        allowed = (*allowed, "matches")
    body, base = _body(r, obj, top_level=False, allowed=allowed, required=("service", "backends"))
    service = r.dns_subdomain(body.get("service"), _join(base, "service"))
    bp = _join(base, "backends")
    items = r.sequence(body.get("backends"), bp, non_empty=True)
    raw: list[tuple[str, Fraction, str]] = []
    names: set[str] = set()
    for i, item in enumerate(items or ()):
        p = _idx(bp, i)
        m = r.mapping(item, p, allowed=("service", "weight"), required=("service", "weight"))
        if m is None:
            continue
        svc = r.dns_subdomain(m.get("service"), _join(p, "service"))
        weight = _weight(r, m.get("weight"), _join(p, "weight"), quantity=version == "v1alpha1")
        if svc is not None and svc in names:
            r.fail(_join(p, "service"), f"backend {svc!r} is listed more than once")
            continue
        if svc is not None:
            names.add(svc)
        if svc is None or weight is None:
            continue
        raw.append((svc, weight, p))
    backends = _scale_weights(r, raw, bp)
    if backends and sum(b.weight for b in backends) == 0:
        r.fail(bp, "the weights sum to zero: no traffic could be routed")
    matches: list[RouteRef] = []
    if body.get("matches") is not None:
        mp = _join(base, "matches")
        for i, item in enumerate(r.sequence(body.get("matches"), mp) or ()):
            p = _idx(mp, i)
            m = r.mapping(item, p, allowed=("apiGroup", "kind", "name"), required=("kind", "name"))
            if m is None:
                continue
            if m.get("kind") is None:
                continue
            if m.get("kind") != "HTTPRouteGroup":
                r.fail(
                    _join(p, "kind"),
                    f"a TrafficSplit may only match HTTPRouteGroup resources, got {m['kind']!r}",
                )
                continue
            group = m.get("apiGroup")
            if group is not None and group != SPECS:
                r.fail(_join(p, "apiGroup"), f"must be {SPECS}, got {group!r}")
                continue
            ref_name = r.dns_subdomain(m.get("name"), _join(p, "name"))
            if ref_name is None:
                continue
            ref = RouteRef(name=ref_name)
            if ref in matches:
                r.fail(p, f"HTTPRouteGroup {ref_name!r} is listed more than once")
                continue
            matches.append(ref)
    if service is None or r.errors:
        raise _Abort
    return TrafficSplit(
        namespace=namespace,
        name=name,
        service=service,
        backends=tuple(backends),
        matches=tuple(matches),
    )


def _weight(r: _Reader, value: object, path: str, *, quantity: bool) -> Fraction | None:
    if value is None:
        return None  # reported as missing by mapping()
    if quantity:
        # split v1alpha1: a Kubernetes resource.Quantity ("100", 100, "500m", "1k").
        if isinstance(value, bool):
            r.fail(path, f"weight must be a quantity, got boolean {value!r}")
            return None
        if isinstance(value, int):
            q = Fraction(value)
        elif isinstance(value, float):
            q = Fraction(str(value))
        elif isinstance(value, str):
            mq = _QUANTITY.match(value.strip())
            if mq is None:
                r.fail(path, f"weight {value!r} is not a Kubernetes quantity (e.g. 100, 500m, 1k)")
                return None
            sign, digits, suffix = mq.group(1), mq.group(2), mq.group(3) or ""
            if suffix[:1] in ("e", "E"):
                exp = int(suffix[1:])
                if abs(exp) > 30:
                    r.fail(path, f"weight {value!r} is out of range")
                    return None
                mult = Fraction(10) ** exp
            else:
                mult = _QUANTITY_SUFFIX[suffix]
            q = Fraction(digits) * mult * (-1 if sign == "-" else 1)
        else:
            r.fail(path, f"weight must be a quantity, got {_type_name(value)}")
            return None
        if q < 0:
            r.fail(path, f"weight must not be negative, got {value!r}")
            return None
        if q > _MAX_WEIGHT:
            r.fail(path, f"weight must be at most {_MAX_WEIGHT}, got {value!r}")
            return None
        return q
    w = r.integer(value, path, lo=0, hi=_MAX_WEIGHT, what="weight")
    return None if w is None else Fraction(w)


def _scale_weights(r: _Reader, raw: list[tuple[str, Fraction, str]], path: str) -> list[Backend]:
    """Whole-number weights with the same ratios (v1alpha1 quantities may be fractional)."""
    lcm = 1
    for _, w, _ in raw:
        d = w.denominator
        lcm = lcm * d // _gcd(lcm, d)
    out: list[Backend] = []
    for svc, w, p in raw:
        scaled = w * lcm
        if scaled > _MAX_WEIGHT:
            r.fail(
                _join(p, "weight"),
                "fractional weights cannot be scaled to whole numbers within range",
            )
            return []
        out.append(Backend(service=svc, weight=int(scaled)))
    if lcm != 1 and out:
        g = 0
        for b in out:
            g = _gcd(g, b.weight)
        if g > 1:
            out = [Backend(service=b.service, weight=b.weight // g) for b in out]
    return out


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
