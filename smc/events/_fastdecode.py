"""Generated Avro decoders, specialised per schema, for the hot replay path.

Role: fastavro's generic reader dispatches on the schema for every value; replaying a log of
millions of events spends most of its time there. This module compiles one Python function per
(writer schema, event class) that reads the Avro binary body directly into the event dataclasses.
It handles the subset of Avro SMC's schemas use (records, string, int, long, boolean, null
unions, arrays, maps, timestamp-millis); the codec uses it only when the writer schema is the
newest version of its record and falls back to fastavro (with schema resolution) otherwise.
The test suite checks it against fastavro on every schema.
Concurrency: compiled functions are pure; share them freely.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["UnsupportedSchema", "compile_decoder"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class UnsupportedSchema(Exception):
    """The schema uses an Avro feature the generated decoder does not handle."""


def _long_slow(data: bytes, i: int) -> tuple[int, int]:
    b = data[i]
    i += 1
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), i


def _ms(ms: int) -> datetime:
    return _EPOCH + timedelta(0, 0, 0, ms)  # days, seconds, microseconds, milliseconds


class _Gen:
    def __init__(self, classes: Mapping[str, type]) -> None:
        self.lines: list[str] = []
        self.n = 0
        self.classes = classes
        self.env: dict[str, Any] = {"_long_slow": _long_slow, "_ms": _ms, "_new": object.__new__}

    def var(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def emit(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)

    def long(self, depth: int, target: str) -> None:
        b = self.var("b")
        self.emit(depth, f"{b} = data[i]")
        self.emit(depth, f"if {b} < 0x80:")
        self.emit(depth + 1, f"{target} = ({b} >> 1) ^ -({b} & 1)")
        self.emit(depth + 1, "i += 1")
        self.emit(depth, "else:")
        self.emit(depth + 1, f"{target}, i = _long_slow(data, i)")

    def value(self, schema: Any, depth: int, target: str) -> None:
        if isinstance(schema, list):
            if len(schema) == 2 and schema[0] == "null":
                idx = self.var("u")
                self.long(depth, idx)
                self.emit(depth, f"if {idx} == 0:")
                self.emit(depth + 1, f"{target} = None")
                self.emit(depth, f"elif {idx} == 1:")
                self.value(schema[1], depth + 1, target)
                self.emit(depth, "else:")
                self.emit(depth + 1, f"raise ValueError('union index ' + str({idx}))")
                return
            raise UnsupportedSchema(f"union {schema!r}")
        if isinstance(schema, str):
            t, logical = schema, None
        else:
            t, logical = schema["type"], schema.get("logicalType")
        if t in ("int", "long"):
            self.long(depth, target)
            if logical == "timestamp-millis":
                self.emit(depth, f"{target} = _ms({target})")
        elif t == "string":
            # the length: a zigzag varint, one byte below 64 characters (an odd byte is a
            # negative length); ``end`` is the record's length, read once per record
            n = self.var("n")
            self.emit(depth, f"{n} = data[i]")
            self.emit(depth, f"if {n} < 0x80:")
            self.emit(depth + 1, f"if {n} & 1:")
            self.emit(depth + 2, "raise ValueError('string length out of range')")
            self.emit(depth + 1, f"{n} >>= 1")
            self.emit(depth + 1, "i += 1")
            self.emit(depth, "else:")
            self.emit(depth + 1, f"{n}, i = _long_slow(data, i)")
            self.emit(depth + 1, f"if {n} < 0:")
            self.emit(depth + 2, "raise ValueError('string length out of range')")
            self.emit(depth, f"if i + {n} > end:")
            self.emit(depth + 1, "raise ValueError('string length out of range')")
            self.emit(depth, f"{target} = data[i:i + {n}].decode()")
            self.emit(depth, f"i += {n}")
        elif t == "boolean":
            self.emit(depth, f"{target} = data[i] == 1")
            self.emit(depth, "i += 1")
        elif t == "array":
            self.block(schema["items"], depth, target, is_map=False)
        elif t == "map":
            self.block(schema["values"], depth, target, is_map=True)
        elif t == "record":
            self.record(schema, depth, target)
        else:
            raise UnsupportedSchema(f"type {t!r}")

    def block(self, items: Any, depth: int, target: str, *, is_map: bool) -> None:
        acc = self.var("acc")
        cnt = self.var("c")
        self.emit(depth, f"{acc} = {{}}" if is_map else f"{acc} = []")
        self.emit(depth, "while True:")
        self.long(depth + 1, cnt)
        self.emit(depth + 1, f"if {cnt} == 0:")
        self.emit(depth + 2, "break")
        self.emit(depth + 1, f"if {cnt} < 0:")
        self.emit(depth + 2, f"{cnt} = -{cnt}")
        skip = self.var("s")
        self.long(depth + 2, skip)
        self.emit(depth + 1, f"for _ in range({cnt}):")
        item = self.var("it")
        if is_map:
            key = self.var("k")
            self.value("string", depth + 2, key)
            self.value(items, depth + 2, item)
            self.emit(depth + 2, f"{acc}[{key}] = {item}")
        else:
            self.value(items, depth + 2, item)
            self.emit(depth + 2, f"{acc}.append({item})")
        if is_map:
            self.emit(depth, f"{target} = {acc}")
        else:
            self.emit(depth, f"{target} = tuple({acc})")

    def record(self, schema: Mapping[str, Any], depth: int, target: str) -> None:
        name = schema["name"]
        cls = self.classes.get(name)
        if cls is None:
            raise UnsupportedSchema(f"no class for record {name}")
        cname = self.var("cls")
        self.env[cname] = cls
        names = []
        for f in schema["fields"]:
            v = self.var("f")
            self.value(f["type"], depth, v)
            names.append((f["name"], v))
        self.emit(depth, f"{target} = _new({cname})")
        fields = ", ".join(f"{k!r}: {v}" for k, v in names)
        self.emit(depth, f"{target}.__dict__.update({{{fields}}})")


def compile_decoder(
    schema: Mapping[str, Any], *, classes: Mapping[str, type]
) -> Callable[[bytes, int], tuple[Any, int]]:
    """Compile ``decode(data, offset) -> (object, end offset)`` for a parsed record schema.

    ``classes`` maps each record's full name to the (non-slotted) dataclass to build.
    Raises :class:`UnsupportedSchema` for Avro features outside SMC's subset.
    """
    gen = _Gen(classes)
    gen.emit(0, "def decode(data, i):")
    gen.emit(1, "end = len(data)")
    gen.record(schema, 1, "out")
    gen.emit(1, "return out, i")
    src = "\n".join(gen.lines)
    code = compile(src, f"<avro decoder {schema['name']}>", "exec")
    exec(code, gen.env)
    fn: Callable[[bytes, int], tuple[Any, int]] = gen.env["decode"]
    return fn
