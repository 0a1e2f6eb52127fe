"""The few protobuf messages of SDS, encoded and decoded by hand (the agent stays small).

Role: the agent's SDS server needs to read ``DiscoveryRequest`` (resource names, type URL,
response nonce, error detail) and write ``DiscoveryResponse`` carrying one
``envoy.extensions.transport_sockets.tls.v3.Secret`` with a ``TlsCertificate`` (chain and key
as inline strings). Loading Envoy's generated protobuf modules costs the agent ~0.1 s and a few
MB, so this module speaks those fields of the wire format directly (varints and
length-delimited fields); unknown fields are skipped, as protobuf readers do. The tests
compare it with the generated classes both ways.
Concurrency: pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from smc.agent._errors import InvalidMessage

__all__ = ["SdsRequest", "decode_request", "encode_secret_response"]

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _string(number: int, text: str) -> bytes:
    return _field(number, text.encode("utf-8")) if text else b""


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise InvalidMessage("DiscoveryRequest: truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """(number, wire type, value) of every field of a message."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            out.append((number, wire, value))
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise InvalidMessage("DiscoveryRequest: truncated field")
            out.append((number, wire, data[pos : pos + size]))
            pos += size
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise InvalidMessage(f"DiscoveryRequest: wire type {wire} not supported")
    return out


@dataclass(frozen=True, slots=True)
class SdsRequest:
    """What the agent reads from a ``DiscoveryRequest``."""

    version_info: str
    resource_names: tuple[str, ...]
    type_url: str
    response_nonce: str
    error: str | None  # error_detail.message of a NACK


def decode_request(data: bytes) -> SdsRequest:
    version = type_url = nonce = ""
    names: list[str] = []
    error: str | None = None
    for number, wire, value in _fields(data):
        if wire != 2 or not isinstance(value, bytes):
            continue
        if number == 1:
            version = value.decode("utf-8", "replace")
        elif number == 3:
            names.append(value.decode("utf-8", "replace"))
        elif number == 4:
            type_url = value.decode("utf-8", "replace")
        elif number == 5:
            nonce = value.decode("utf-8", "replace")
        elif number == 6:  # google.rpc.Status
            error = ""
            for n, w, v in _fields(value):
                if n == 2 and w == 2 and isinstance(v, bytes):
                    error = v.decode("utf-8", "replace")
    return SdsRequest(
        version_info=version,
        resource_names=tuple(names),
        type_url=type_url,
        response_nonce=nonce,
        error=error,
    )


def encode_secret_response(
    *, version: str, nonce: str, name: str | None, chain_pem: str, key_pem: str
) -> bytes:
    """A ``DiscoveryResponse`` with the ``Secret`` ``name`` (none when ``name`` is None)."""
    body = _string(1, version)
    if name is not None:
        tls = _field(1, _string(3, chain_pem)) + _field(2, _string(3, key_pem))
        secret = _string(1, name) + _field(2, tls)
        body += _field(2, _string(1, SECRET_TYPE) + _field(2, secret))
    return body + _string(4, SECRET_TYPE) + _string(5, nonce)
