"""Any JSON-like manifest either parses or raises ManifestErrors: never another exception."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from smc.smi import SUPPORTED, ManifestErrors, parse_manifest

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(
        st.sampled_from(
            ["name", "namespace", "kind", "rules", "sources", "destination", "matches",
             "pathRegex", "methods", "headers", "backends", "service", "weight", "ports",
             "port", "specs", "spec", "address", "serviceAccount", "selector", "x"]
        ),
        inner,
        max_size=4,
    ),
    max_leaves=12,
)

kinds = st.sampled_from(sorted((k, v) for k, vs in SUPPORTED.items() for v in vs))


@settings(max_examples=400, deadline=None)
@given(kinds, json_values, json_values)
def test_parse_never_crashes(kv: tuple[str, str], spec: object, extra: object) -> None:
    kind, api_version = kv
    obj: dict[str, object] = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": "x", "namespace": "ns"},
        "spec": spec,
    }
    if isinstance(extra, dict):
        obj.update({k: v for k, v in extra.items() if k not in ("apiVersion", "kind")})
    try:
        parse_manifest(obj, document="fuzz#0")
    except ManifestErrors as exc:
        assert "fuzz#0" in str(exc)
