"""The schema directories as integrators use them: ``schemas/`` is ready for Avro code
generation (the current version of each event type, every full name defined once),
``schemas-history/`` keeps the older versions, and no fingerprint ever published changes
(records already on a log keep decoding)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from smc.events import EVENT_TYPES, Codec, UnknownSchema, default_codec

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "schemas"
HISTORY = ROOT / "schemas-history"
VERSIONED = re.compile(r"^(?P<name>.+)\.v(?P<version>\d+)\.avsc$")

#: Every schema version SMC has written records with, and its CRC-64-AVRO fingerprint. A new
#: version adds a line here; an existing line never changes.
PUBLISHED = {
    "smc.certs.CertificateIssued.v1": "962cf634a2a905c1",
    "smc.certs.CertificateRenewed.v1": "e27784918ca96a18",
    "smc.certs.CertificateRevoked.v1": "25917163e8749e58",
    "smc.certs.JoinTokenIssued.v1": "42f9121fc39a5460",
    "smc.certs.ProxyCertificateIssued.v1": "3b193926b030419b",
    "smc.certs.ProxyCertificateRevoked.v1": "227f4479593e2b3e",
    "smc.certs.TrustBundleChanged.v1": "9f742e44a5dbaa67",
    "smc.policy.MeshConfigChanged.v1": "aa59ba577f4722bd",
    "smc.policy.SmiResourceApplied.v1": "1cbeb20b0faa2636",
    "smc.policy.SmiResourceDeleted.v1": "4cddc46abeacb53f",
    "smc.registry.EndpointsChanged.v1": "db85b766abed6322",
    "smc.registry.ServiceAccountRemoved.v1": "3e8424f8356335ce",
    "smc.registry.ServiceAccountUpserted.v1": "fb5384fd804564e8",
    "smc.registry.ServiceRemoved.v1": "fbc2bb6870406fe9",
    "smc.registry.ServiceUpserted.v1": "b6a2339e6cc14a12",
    "smc.registry.ServiceUpserted.v2": "018dad23f51f7e78",
    "smc.registry.VmGroupStatusChanged.v1": "5ff8a786dc7ef1ed",
    "smc.registry.VmInstanceChanged.v1": "b19c616d39b2ab55",
    "smc.registry.WorkloadJoined.v1": "aa7a477612c5a538",
    "smc.registry.WorkloadLeft.v1": "302660990a952755",
}


def _defined(schema: Any, namespace: str = "") -> list[str]:
    """Full names of the named types a schema document defines (not those it references)."""
    out: list[str] = []
    if isinstance(schema, list):
        for s in schema:
            out += _defined(s, namespace)
    elif isinstance(schema, dict):
        if schema.get("type") in ("record", "enum", "fixed"):
            name = schema["name"]
            ns = schema.get("namespace", namespace)
            full = name if "." in name else f"{ns}.{name}" if ns else name
            out.append(full)
            namespace = full.rpartition(".")[0]
        for key in ("fields", "items", "values"):
            if key in schema:
                for f in schema[key] if key == "fields" else [schema[key]]:
                    out += _defined(f["type"] if key == "fields" else f, namespace)
        if isinstance(schema.get("type"), dict | list):
            out += _defined(schema["type"], namespace)
    return out


def test_every_published_fingerprint_is_unchanged() -> None:
    codec = default_codec()
    found = {f"{i.name}.v{i.version}": i.fingerprint.hex() for i in codec.by_fingerprint.values()}
    assert {k: found.get(k) for k in PUBLISHED} == PUBLISHED
    assert set(found) >= set(PUBLISHED)


def test_schemas_holds_the_current_version_of_each_type_once() -> None:
    current = Counter()
    for path in SCHEMAS.glob("*.avsc"):
        m = VERSIONED.match(path.name)
        if m:
            current[m["name"]] += 1
    assert set(current) == set(EVENT_TYPES)
    assert set(current.values()) == {1}
    codec = default_codec()
    for name, info in codec.latest.items():
        assert info.path.parent.name == "schemas", name
    for path in HISTORY.glob("*.avsc"):
        m = VERSIONED.match(path.name)
        assert m, path.name
        assert int(m["version"]) < codec.latest[m["name"]].version, path.name


def test_every_full_name_is_defined_once_in_schemas() -> None:
    """What avro-maven-plugin / avro-tools need: one definition per full name (shared types
    such as smc.events.Envelope live in their own file and are referenced by name)."""
    defined = Counter()
    for path in SCHEMAS.glob("*.avsc"):
        defined.update(_defined(json.loads(path.read_text())))
    assert [n for n, c in defined.items() if c > 1] == []
    assert "smc.events.Envelope" in defined


def test_codec_refuses_a_bad_layout(tmp_path: Path) -> None:
    cur, hist = tmp_path / "cur", tmp_path / "hist"
    cur.mkdir()
    hist.mkdir()
    for p in SCHEMAS.glob("*.avsc"):
        (cur / p.name).write_text(p.read_text())
    for p in HISTORY.glob("*.avsc"):
        (hist / p.name).write_text(p.read_text())
    assert Codec(cur, hist).by_fingerprint.keys() == default_codec().by_fingerprint.keys()
    # an older version left in schemas/ (what broke code generation)
    old = next(HISTORY.glob("*.avsc"))
    (hist / old.name).rename(cur / old.name)
    with pytest.raises(UnknownSchema, match="only the current version"):
        Codec(cur, hist)
    (cur / old.name).rename(hist / old.name)
    # the newest version only in the history
    newest = default_codec().latest[VERSIONED.match(old.name)["name"]].path  # type: ignore[index]
    (hist / newest.name).write_text((cur / newest.name).read_text())
    (cur / newest.name).unlink()
    with pytest.raises(UnknownSchema, match="must be in"):
        Codec(cur, hist)
