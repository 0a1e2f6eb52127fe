"""Parser of OSM's Retry policy.

Role: validate and normalise ``Retry`` manifests (source ServiceAccount, destination Services,
retryPolicy with Envoy retry conditions and Go durations) as OSM wrote them, reporting every
problem with its field path, and build the canonical ``spec_json``. Dispatched to via
:data:`smc.smi._osm_parse.OSM_PARSERS`.
Concurrency: pure functions over their arguments; safe everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smc.smi._osm_common import _go_duration, _service_account, _spec_json, format_go_duration
from smc.smi._osm_model import RetryPolicy
from smc.smi._reader import _Abort, _body, _idx, _join, _Reader

_RETRY_ON = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)


def _retry(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> RetryPolicy:
    body, base = _body(
        r,
        obj,
        top_level=False,
        allowed=("source", "destinations", "retryPolicy"),
        required=("source", "destinations", "retryPolicy"),
    )
    source = None
    if body.get("source") is not None:
        source = _service_account(r, body.get("source"), _join(base, "source"), namespace)
    dests: list[str] = []
    dp = _join(base, "destinations")
    for i, item in enumerate(r.sequence(body.get("destinations"), dp, non_empty=True) or ()):
        p = _idx(dp, i)
        m = r.mapping(item, p, allowed=("kind", "name", "namespace"), required=("kind", "name"))
        if m is None:
            continue
        if m.get("kind") != "Service":
            r.fail(_join(p, "kind"), f"must be Service, got {m.get('kind')!r}")
            continue
        dname = r.dns_label(m.get("name"), _join(p, "name"))
        dns = namespace
        if m.get("namespace") is not None:
            dns = r.dns_label(m.get("namespace"), _join(p, "namespace")) or namespace
        if dname is not None and f"{dns}/{dname}" not in dests:
            dests.append(f"{dns}/{dname}")
    rp = _join(base, "retryPolicy")
    policy = r.mapping(
        body.get("retryPolicy") or {},
        rp,
        allowed=("retryOn", "perTryTimeout", "numRetries", "retryBackoffBaseInterval"),
        required=("retryOn",),
    )
    retry_on = ""
    per_try = num = backoff = None
    if policy is not None:
        raw = r.string(policy.get("retryOn"), _join(rp, "retryOn"))
        if raw is not None:
            parts = [x.strip() for x in raw.split(",") if x.strip()]
            bad = [x for x in parts if x not in _RETRY_ON]
            if bad or not parts:
                r.fail(
                    _join(rp, "retryOn"),
                    f"unknown retry condition {bad[0] if bad else raw!r} (one or more,"
                    f" comma separated, of: {', '.join(sorted(_RETRY_ON))})",
                )
            retry_on = ",".join(dict.fromkeys(parts))
        per_try = _go_duration(r, policy.get("perTryTimeout"), _join(rp, "perTryTimeout"))
        if policy.get("numRetries") is not None:
            num = r.integer(
                policy.get("numRetries"), _join(rp, "numRetries"), lo=0, hi=1000, what="numRetries"
            )
        backoff = _go_duration(
            r, policy.get("retryBackoffBaseInterval"), _join(rp, "retryBackoffBaseInterval")
        )
    if r.errors or source is None:
        raise _Abort
    dests.sort()
    plain: dict[str, Any] = {"retryOn": retry_on}
    if per_try is not None:
        plain["perTryTimeout"] = format_go_duration(per_try)
    if num is not None:
        plain["numRetries"] = num
    if backoff is not None:
        plain["retryBackoffBaseInterval"] = format_go_duration(backoff)
    spec = {
        "source": {"kind": "ServiceAccount", "name": source.name, "namespace": source.namespace},
        "destinations": [
            {"kind": "Service", "name": d.split("/", 1)[1], "namespace": d.split("/", 1)[0]}
            for d in dests
        ],
        "retryPolicy": plain,
    }
    return RetryPolicy(
        namespace=namespace,
        name=name,
        spec_json=_spec_json(spec),
        source=source,
        destinations=tuple(dests),
        retry_on=retry_on,
        per_try_timeout_ms=per_try,
        num_retries=num,
        backoff_base_ms=backoff,
    )
