"""Serial and validity of an X.509 certificate, read from its DER with the standard library.

Role: the resident agent (:mod:`smc.agent._step`) takes up the certificate it finds in its
proxy dir after a restart and needs its serial and validity without ``cryptography``. This
module walks the certificate's outer DER structure (``Certificate`` -> ``tbsCertificate`` ->
optional ``[0]`` version, ``serialNumber``, ``signature``, ``issuer``, ``validity``) and
nothing more: it reads certificates the agent wrote itself from answers of the control plane
(whose signature Envoy and the peers check), so it trusts no field for a security decision;
the key match is checked by OpenSSL (:meth:`smc.agent._openssl.EcKey.matches_certificate`).
Malformed input raises ``ValueError``.
Concurrency: pure functions.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["CertInfo", "cert_info", "first_pem_der"]

_PEM = re.compile(r"-----BEGIN CERTIFICATE-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END CERTIFICATE-----")


@dataclass(frozen=True, slots=True)
class CertInfo:
    serial: str  # hex of the serial's big-endian bytes, as the control plane names it
    not_before: datetime
    not_after: datetime


def first_pem_der(pem: str) -> bytes:
    """The DER of the first certificate in ``pem``."""
    m = _PEM.search(pem)
    if m is None:
        raise ValueError("no PEM certificate")
    return base64.b64decode("".join(m.group(1).split()), validate=True)


def _tlv(data: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at ``at``."""
    if at + 2 > len(data):
        raise ValueError("DER: truncated")
    tag = data[at]
    length = data[at + 1]
    at += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or at + n > len(data):
            raise ValueError("DER: bad length")
        length = int.from_bytes(data[at : at + n], "big")
        at += n
    if at + length > len(data):
        raise ValueError("DER: truncated")
    return tag, at, at + length


def _time(tag: int, raw: bytes) -> datetime:
    text = raw.decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ
        parsed = datetime.strptime(text, "%y%m%d%H%M%SZ")
    elif tag == 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        parsed = datetime.strptime(text, "%Y%m%d%H%M%SZ")
    else:
        raise ValueError("DER: validity is not a time")
    return parsed.replace(tzinfo=UTC)


def cert_info(der: bytes) -> CertInfo:
    """Serial and validity of the certificate ``der``."""
    tag, start, _ = _tlv(der, 0)
    if tag != 0x30:
        raise ValueError("DER: not a certificate")
    tag, at, _ = _tlv(der, start)  # tbsCertificate
    if tag != 0x30:
        raise ValueError("DER: no tbsCertificate")
    tag, s, e = _tlv(der, at)
    if tag == 0xA0:  # [0] EXPLICIT version
        tag, s, e = _tlv(der, e)
    if tag != 0x02:
        raise ValueError("DER: no serial number")
    value = int.from_bytes(der[s:e], "big", signed=True)
    serial = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big").hex()
    for _ in range(2):  # signature algorithm, issuer
        _, _, e = _tlv(der, e)
    tag, s, _ = _tlv(der, e)
    if tag != 0x30:
        raise ValueError("DER: no validity")
    t1, s1, e1 = _tlv(der, s)
    t2, s2, e2 = _tlv(der, e1)
    return CertInfo(
        serial=serial, not_before=_time(t1, der[s1:e1]), not_after=_time(t2, der[s2:e2])
    )
