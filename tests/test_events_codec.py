"""The Avro codec: round trips, schema evolution, the public schema contract, bad records."""

from __future__ import annotations

import io
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest
from eventgen import EVENTS, any_event, service
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form
from hypothesis import given, settings

from smc.events import (
    EVENT_TYPES,
    MAGIC,
    DecodeError,
    Event,
    InvalidEvent,
    ServicePort,
    ServiceUpserted,
    UnknownSchema,
    default_codec,
    make_event,
)

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
HISTORY = Path(__file__).resolve().parent.parent / "schemas-history"


@settings(max_examples=300, deadline=None)
@given(any_event)
def test_every_event_round_trips(event: Event) -> None:
    codec = default_codec()
    data = codec.encode(event)
    assert data[:2] == MAGIC
    assert data[2:10] == codec.fingerprint_of(type(event).TYPE)
    assert codec.decode(data) == event


@settings(max_examples=200, deadline=None)
@given(any_event)
def test_generated_decoder_agrees_with_fastavro(event: Event) -> None:
    codec = default_codec()
    data = codec.encode(event)
    name, d = codec.decode_dict(data)
    slow = codec._decoders[name](d)
    assert codec.decode(data) == slow == event


def test_every_type_has_a_strategy_and_a_schema() -> None:
    assert set(EVENTS) == set(EVENT_TYPES.values())
    codec = default_codec()
    for name, cls in EVENT_TYPES.items():
        schema = json.loads(codec.latest[name].path.read_text())
        avro_fields = [f["name"] for f in schema["fields"]]
        assert avro_fields == [f.name for f in fields(cls)], name


def test_older_schema_version_decodes_with_newer() -> None:
    """A ServiceUpserted written with v1 (no labels) reads as v2 with the default labels."""
    v1 = parse_schema(json.loads((HISTORY / "smc.registry.ServiceUpserted.v1.avsc").read_text()))
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(v1), "CRC-64-AVRO"))
    ev = service(1)
    record = default_codec()._encoders[ServiceUpserted](ev)
    del record["labels"]
    buf = io.BytesIO()
    buf.write(MAGIC + fp)
    schemaless_writer(buf, v1, record)
    decoded = default_codec().decode(buf.getvalue())
    assert isinstance(decoded, ServiceUpserted)
    assert decoded.labels == {}
    assert decoded == ev
    assert fp != default_codec().fingerprint_of(ServiceUpserted.TYPE)


def test_consumer_with_only_the_schemas_directory_decodes() -> None:
    """What a third-party consumer does: fastavro + schemas/*.avsc, no SMC code (the shared
    named types first, then every event schema with its references expanded)."""
    named: dict[str, object] = {}
    for path in SCHEMAS.glob("*.avsc"):
        if not re.search(r"\.v\d+\.avsc$", path.name):  # NAME.avsc: a shared type
            parse_schema(json.loads(path.read_text()), named)
    by_fp = {}
    for path in [*SCHEMAS.glob("*.v*.avsc"), *HISTORY.glob("*.avsc")]:
        parsed = parse_schema(json.loads(path.read_text()), dict(named), expand=True)
        by_fp[bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))] = parsed
    data = default_codec().encode(service(7, actor="carol"))
    assert data[:2] == b"\xc3\x01"
    body = io.BytesIO(data[10:])
    rec = schemaless_reader(body, by_fp[data[2:10]], None)
    assert rec["name"] == "svc7"
    assert rec["envelope"]["actor"] == "carol"
    assert rec["ports"][0]["target_port"] == 8080


def test_generated_decoder_reads_long_and_non_ascii_strings() -> None:
    """Strings of 64 characters and more (a length of two varint bytes or more) and
    multi-byte characters decode as fastavro reads them."""
    codec = default_codec()
    for eid in ("x" * 63, "x" * 64, "é" * 40, "y" * 9000):
        data = codec.encode(service(3, event_id=eid, actor="ü" * 70))
        name, d = codec.decode_dict(data)
        assert codec.decode(data) == codec._decoders[name](d)
        assert codec.decode(data).envelope.event_id == eid


@pytest.mark.parametrize(
    ("mangle", "err", "needle"),
    [
        (lambda b: b"\x00\x01" + b[2:], DecodeError, "bad magic"),
        (lambda b: b[:2] + b"\xff" * 8 + b[10:], UnknownSchema, "unknown writer schema"),
        (lambda b: b[:-5], DecodeError, "corrupt"),
        (lambda b: b + b"\x00\x00", DecodeError, "trailing"),
        (lambda b: b[:3], DecodeError, "bad magic"),
        (lambda b: b[:10] + b"\x80" * 20, DecodeError, "corrupt"),
        # the event id's length (the body's first field): negative in one byte and in two,
        # then past the record's end in one byte and in three
        (lambda b: b[:10] + b"\x03" + b[11:], DecodeError, "string length out of range"),
        (lambda b: b[:10] + b"\x81\x01" + b[11:], DecodeError, "string length out of range"),
        (lambda b: b[:10] + b"\x7e" + b[11:20], DecodeError, "string length out of range"),
        (lambda b: b[:10] + b"\xfe\xff\x03" + b[11:], DecodeError, "string length out of range"),
    ],
)
def test_bad_records_name_their_position(mangle, err, needle) -> None:  # type: ignore[no-untyped-def]
    data = mangle(default_codec().encode(service(1)))
    with pytest.raises(err) as info:
        default_codec().decode(data, where="smc.registry[0]@42")
    assert "smc.registry[0]@42" in str(info.value)
    assert needle in str(info.value)


def test_invalid_event_names_the_field() -> None:
    bad = make_event(
        ServiceUpserted,
        source="api",
        actor="a",
        namespace="ns",
        name="x",
        ports=(ServicePort(name="http", port="eighty", protocol="http", target_port=1),),  # type: ignore[arg-type]
        backing="kubernetes",
        selector={},
    )
    with pytest.raises(InvalidEvent) as info:
        default_codec().encode(bad)
    assert "smc.registry.ServiceUpserted" in str(info.value)
