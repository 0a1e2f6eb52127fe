"""Avro codec for SMC events: single-object encoding with the writer schema's fingerprint.

Role: turns :class:`~smc.events.Event` values into bytes and back. Every record is
``C3 01`` + the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's Parsing
Canonical Form + the Avro binary body (the Avro specification's single-object encoding), so a
consumer holding ``schemas/`` and ``schemas-history/`` can decode every event ever written.
Records are always written with the newest version of their schema and read into the newest
version (Avro schema resolution fills fields added later from their defaults).

Layout (laid out for standard Avro code generation): ``schemas/`` holds the *current* version
of every event type (``NAME.vN.avsc``) plus the named types they share (``NAME.avsc``, e.g.
``smc.events.Envelope``), which the event schemas reference by name, so every full name is
defined exactly once there; ``schemas-history/`` holds the older versions, self-contained,
kept for resolution only. A reference is expanded before fingerprinting, so the fingerprint of
a schema does not depend on how its file is split (the Parsing Canonical Form is the same).
Concurrency: a :class:`Codec` is immutable after construction; share it between threads.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from smc.events._errors import DecodeError, InvalidEvent, UnknownSchema
from smc.events._fastdecode import UnsupportedSchema, _long_slow, compile_decoder
from smc.events._types import (
    EVENT_TYPES,
    Endpoint,
    EndpointsChanged,
    Envelope,
    Event,
    ServicePort,
    ServiceUpserted,
    TrustBundleChanged,
    WorkloadJoined,
    WorkloadPort,
)

__all__ = ["MAGIC", "Codec", "SchemaInfo", "default_codec", "history_dir", "schemas_dir"]

MAGIC = b"\xc3\x01"
_FILE_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)\.v(?P<version>\d+)\.avsc$")
_SHARED_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)\.avsc$")

# Fields whose Avro array of records maps to a tuple of these dataclasses.
_NESTED: Mapping[type[Event], Mapping[str, type]] = {
    ServiceUpserted: {"ports": ServicePort},
    EndpointsChanged: {"endpoints": Endpoint},
    WorkloadJoined: {"ports": WorkloadPort},
}
_TUPLES: Mapping[type[Event], tuple[str, ...]] = {TrustBundleChanged: ("roots_pem",)}


def schemas_dir() -> Path:
    """The directory holding the current ``*.avsc`` files (shipped inside the package)."""
    return Path(__file__).resolve().parent / "schemas"


def history_dir() -> Path:
    """The directory holding the older schema versions (shipped inside the package)."""
    return Path(__file__).resolve().parent / "schemas_history"


def _load_shared(directory: Path) -> dict[str, Any]:
    """The named types of ``directory``'s ``NAME.avsc`` files, for the event schemas' refs."""
    named: dict[str, Any] = {}
    for path in sorted(directory.glob("*.avsc")):
        if _FILE_RE.match(path.name) is None and _SHARED_RE.match(path.name) is not None:
            parse_schema(json.loads(path.read_text()), named)
    return named


class SchemaInfo:
    """One version of one record schema, with its fingerprint."""

    __slots__ = ("fingerprint", "name", "parsed", "path", "version")

    def __init__(self, *, name: str, version: int, parsed: Any, fp: bytes, path: Path) -> None:
        self.name = name
        self.version = version
        self.parsed = parsed
        self.fingerprint = fp
        self.path = path


def _new(cls: Any, values: dict[str, Any]) -> Any:
    # Frozen dataclasses without slots: filling __dict__ is the fast, exact construction path.
    obj = cls.__new__(cls)
    obj.__dict__.update(values)
    return obj


def _make_decoder(cls: type[Event]) -> Callable[[dict[str, Any]], Event]:
    nested = dict(_NESTED.get(cls, {}))
    tuples = _TUPLES.get(cls, ())

    def decode(d: dict[str, Any]) -> Event:
        d["envelope"] = _new(Envelope, d["envelope"])
        for name, sub in nested.items():
            d[name] = tuple([_new(sub, x) for x in d[name]])
        for name in tuples:
            d[name] = tuple(d[name])
        return _new(cls, d)  # type: ignore[no-any-return]

    return decode


def _make_encoder(cls: type[Event]) -> Callable[[Event], dict[str, Any]]:
    names = [f.name for f in fields(cls) if f.name != "envelope"]
    env_names = [f.name for f in fields(Envelope)]
    nested = {n: [f.name for f in fields(sub)] for n, sub in _NESTED.get(cls, {}).items()}

    def encode(ev: Event) -> dict[str, Any]:
        env = ev.envelope
        out: dict[str, Any] = {"envelope": {n: getattr(env, n) for n in env_names}}
        for n in names:
            v = getattr(ev, n)
            sub = nested.get(n)
            if sub is not None:
                v = [{k: getattr(x, k) for k in sub} for x in v]
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = dict(v)
            out[n] = v
        return out

    return encode


class Codec:
    """Encodes and decodes events against the schemas in a directory."""

    def __init__(self, directory: Path | None = None, history: Path | None = None) -> None:
        """``directory``: the current schemas (default: the packaged ``schemas/``);
        ``history``: the older versions (default: the packaged ones when ``directory`` is the
        default, else none)."""
        self.directory = directory or schemas_dir()
        if history is None and directory is None:
            history = history_dir()
        self.history = history
        self.by_fingerprint: dict[bytes, SchemaInfo] = {}
        self.latest: dict[str, SchemaInfo] = {}
        shared = _load_shared(self.directory)
        paths = sorted(self.directory.glob("*.avsc"))
        if history is not None:
            paths += sorted(history.glob("*.avsc"))
        for path in paths:
            m = _FILE_RE.match(path.name)
            if m is None:
                if path.parent == self.directory and _SHARED_RE.match(path.name):
                    continue  # a shared named type, loaded above
                raise UnknownSchema(where=str(path), reason="schema file name is not NAME.vN.avsc")
            raw = json.loads(path.read_text())
            try:
                # References to shared types are expanded: the parsed schema (and so its
                # canonical form and fingerprint) is the self-contained one.
                parsed = parse_schema(raw, dict(shared), expand=True)
            except Exception as exc:  # fastavro raises several types for a bad schema
                raise UnknownSchema(where=str(path), reason=f"invalid schema: {exc}") from exc
            fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
            info = SchemaInfo(
                name=m["name"], version=int(m["version"]), parsed=parsed, fp=fp, path=path
            )
            if fp in self.by_fingerprint:
                raise UnknownSchema(
                    where=str(path),
                    reason=f"same schema as {self.by_fingerprint[fp].path} (fingerprint {fp.hex()})",
                )
            self.by_fingerprint[fp] = info
            cur = self.latest.get(info.name)
            if cur is None or cur.version < info.version:
                self.latest[info.name] = info
        current: dict[str, Path] = {}
        for info in self.by_fingerprint.values():
            if info.path.parent != self.directory:
                continue
            if info.name in current:
                raise UnknownSchema(
                    where=str(info.path),
                    reason=f"{current[info.name].name} is also in {self.directory}: only the "
                    "current version of a type belongs there (older ones go to the history)",
                )
            current[info.name] = info.path
        for info in self.latest.values():
            if info.path.parent != self.directory:
                raise UnknownSchema(
                    where=str(info.path),
                    reason=f"the newest version of {info.name} must be in {self.directory}",
                )
        for info in self.by_fingerprint.values():
            first = info.parsed["fields"][0]
            if first["name"] != "envelope" or first["type"]["fields"][0]["name"] != "event_id":
                raise UnknownSchema(
                    where=str(info.path), reason="first field must be envelope.event_id"
                )
        missing = sorted(set(EVENT_TYPES) - set(self.latest))
        if missing:
            raise UnknownSchema(where=str(self.directory), reason=f"no schema for {missing}")
        self._decoders = {name: _make_decoder(cls) for name, cls in EVENT_TYPES.items()}
        self._encoders = {cls: _make_encoder(cls) for cls in EVENT_TYPES.values()}
        self._headers = {info.name: MAGIC + info.fingerprint for info in self.latest.values()}
        classes: dict[str, type] = {
            "smc.events.Envelope": Envelope,
            "smc.registry.ServicePort": ServicePort,
            "smc.registry.Endpoint": Endpoint,
            "smc.registry.WorkloadPort": WorkloadPort,
            **EVENT_TYPES,
        }
        self._fast: dict[bytes, Callable[[bytes, int], tuple[Any, int]]] = {}
        for info in self.latest.values():
            try:
                self._fast[info.fingerprint] = compile_decoder(info.parsed, classes=classes)
            except UnsupportedSchema:  # pragma: no cover - all SMC schemas are supported
                continue

    def envelope_id(self, data: bytes) -> bytes:
        """The raw UTF-8 event id of an encoded record, read without decoding the record.

        Every SMC schema starts with the envelope, whose first field is ``event_id``
        (checked when the codec loads the schemas), so the id sits right after the header.
        """
        b = data[10]
        if b < 0x80:
            n, i = (b >> 1) ^ -(b & 1), 11
        else:
            n, i = _long_slow(data, 10)
        return data[i : i + n]

    def fingerprint_of(self, event_type: str) -> bytes:
        """The fingerprint new records of ``event_type`` are written with."""
        return self.latest[event_type].fingerprint

    def encode(self, event: Event) -> bytes:
        """Single-object encode ``event`` with the newest schema of its type."""
        cls = type(event)
        enc = self._encoders.get(cls)
        if enc is None:
            raise InvalidEvent(event_type=cls.__name__, field="<type>", reason="not an SMC event")
        info = self.latest[cls.TYPE]
        buf = io.BytesIO()
        buf.write(self._headers[cls.TYPE])
        try:
            schemaless_writer(buf, info.parsed, enc(event))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidEvent(
                event_type=cls.TYPE, field=_field_hint(exc), reason=str(exc)
            ) from exc
        return buf.getvalue()

    def header(self, data: bytes, *, where: str) -> SchemaInfo:
        """The writer schema of a record, from its header."""
        if len(data) < 10 or data[:2] != MAGIC:
            raise DecodeError(where=where, reason="not an Avro single-object record (bad magic)")
        info = self.by_fingerprint.get(data[2:10])
        if info is None:
            raise UnknownSchema(
                where=where, reason=f"unknown writer schema fingerprint {data[2:10].hex()}"
            )
        return info

    def decode_dict(self, data: bytes, *, where: str = "?") -> tuple[str, dict[str, Any]]:
        """Decode a record into (event type, plain dict in the newest schema's shape)."""
        info = self.header(data, where=where)
        latest = self.latest[info.name]
        bio = io.BytesIO(data)
        bio.seek(10)
        try:
            if latest is info:
                d = schemaless_reader(bio, info.parsed, None)
            else:
                d = schemaless_reader(bio, info.parsed, latest.parsed)
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise DecodeError(where=where, reason=f"corrupt {info.name} body: {exc!r}") from exc
        if bio.tell() != len(data):
            raise DecodeError(
                where=where,
                reason=f"corrupt {info.name} body: {len(data) - bio.tell()} trailing bytes",
            )
        if not isinstance(d, dict):
            raise DecodeError(where=where, reason="record body is not an Avro record")
        return info.name, d

    def decode(self, data: bytes, *, where: str = "?") -> Event:
        """Decode a record into its event dataclass."""
        fast = self._fast.get(data[2:10]) if data[:2] == MAGIC else None
        if fast is not None:
            try:
                event, end = fast(data, 10)
            except (IndexError, ValueError, UnicodeDecodeError) as exc:
                info = self.by_fingerprint[data[2:10]]
                raise DecodeError(where=where, reason=f"corrupt {info.name} body: {exc!r}") from exc
            if end != len(data):
                info = self.by_fingerprint[data[2:10]]
                raise DecodeError(
                    where=where,
                    reason=f"corrupt {info.name} body: {len(data) - end} trailing bytes",
                )
            return event  # type: ignore[no-any-return]
        name, d = self.decode_dict(data, where=where)
        decoder = self._decoders.get(name)
        if decoder is None:
            raise UnknownSchema(where=where, reason=f"unknown event type {name}")
        try:
            return decoder(d)
        except (KeyError, TypeError) as exc:
            raise DecodeError(where=where, reason=f"{name} lacks field {exc}") from exc


def _field_hint(exc: BaseException) -> str:
    m = re.search(r"(?:field|for) ['\"]?([A-Za-z_][\w.]*)", str(exc))
    return m.group(1) if m else "<unknown>"


_DEFAULT: Codec | None = None


def default_codec() -> Codec:
    """The process-wide codec over the packaged schemas (built on first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Codec()
    return _DEFAULT
