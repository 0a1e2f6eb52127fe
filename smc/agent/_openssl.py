"""EC P-256 keys, CSRs and signatures for the resident agent, from the OpenSSL Python links.

Role: the resident agent (:mod:`smc.agent.__main__`) must stay small, so it does not import
``cryptography`` (~14 MB more per pod). Python's own ``ssl`` module is linked against
OpenSSL's libcrypto; this module calls that library through ``ctypes`` for the few
operations the agent needs: generate an EC P-256 key (:meth:`EcKey.generate`), write and
read it as PKCS #8 PEM, make a CSR with an empty subject (the control plane puts the proven
SPIFFE id in the leaf), sign a renewal message (ECDSA with SHA-256, DER, as
``cryptography`` makes it) and check that a certificate carries the key. Nothing here is a
new cryptographic implementation: OpenSSL does every step; this module only manages the
objects' lifetimes (each one freed in a ``finally``) and turns failures into
:class:`~smc.agent.AgentError` naming OpenSSL's reason. OpenSSL 3 is required (its
``EVP_PKEY_CTX_new_from_name``/``EVP_PKEY_generate`` API).
Concurrency: the functions are blocking and independent; an :class:`EcKey` is used by one
thread at a time (OpenSSL's objects are not shared).
"""

from __future__ import annotations

import base64
import ctypes
import os
import re
from ctypes import POINTER, c_char_p, c_int, c_long, c_size_t, c_ulong, c_void_p
from typing import Any

from smc.agent._errors import AgentError

__all__ = ["EcKey", "csr_pem_of_der", "openssl_version"]

_BIO_CTRL_PENDING = 10
_EVP_PKEY_EC = 408  # NID_X9_62_id_ecPublicKey


def _library_path() -> str | None:
    """The libcrypto this interpreter's ``_ssl`` loaded (from the process's own maps)."""
    import _ssl  # loads libcrypto into the process

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rstrip("\n").split(" ")[-1]
                if re.search(r"/libcrypto[^/]*\.so[^/]*$", path) and os.path.exists(path):
                    return path
    except OSError:
        pass
    import ctypes.util

    found = ctypes.util.find_library("crypto")
    if found is None and getattr(_ssl, "__file__", None):
        # libcrypto linked statically into _ssl (some standalone builds): its own symbols
        return str(_ssl.__file__)
    return found


class _Lib:
    """The libcrypto functions used here, with their C signatures."""

    def __init__(self) -> None:
        path = _library_path()
        if path is None:
            raise AgentError("cannot find OpenSSL's libcrypto (the one Python's ssl module uses)")
        lib = ctypes.CDLL(path)
        self.lib = lib
        sigs: dict[str, tuple[Any, list[Any]]] = {
            "OpenSSL_version_num": (c_ulong, []),
            "ERR_get_error": (c_ulong, []),
            "ERR_error_string_n": (None, [c_ulong, c_char_p, c_size_t]),
            "ERR_clear_error": (None, []),
            "EVP_PKEY_CTX_new_from_name": (c_void_p, [c_void_p, c_char_p, c_char_p]),
            "EVP_PKEY_keygen_init": (c_int, [c_void_p]),
            "EVP_PKEY_CTX_set_group_name": (c_int, [c_void_p, c_char_p]),
            "EVP_PKEY_generate": (c_int, [c_void_p, POINTER(c_void_p)]),
            "EVP_PKEY_CTX_free": (None, [c_void_p]),
            "EVP_PKEY_free": (None, [c_void_p]),
            "EVP_PKEY_get_base_id": (c_int, [c_void_p]),
            "EVP_PKEY_get_bits": (c_int, [c_void_p]),
            "BIO_s_mem": (c_void_p, []),
            "BIO_new": (c_void_p, [c_void_p]),
            "BIO_new_mem_buf": (c_void_p, [c_void_p, c_int]),
            "BIO_read": (c_int, [c_void_p, c_void_p, c_int]),
            "BIO_ctrl": (c_long, [c_void_p, c_int, c_long, c_void_p]),
            "BIO_free": (c_int, [c_void_p]),
            "PEM_write_bio_PrivateKey": (
                c_int,
                [c_void_p, c_void_p, c_void_p, c_void_p, c_int, c_void_p, c_void_p],
            ),
            "PEM_read_bio_PrivateKey": (c_void_p, [c_void_p, c_void_p, c_void_p, c_void_p]),
            "PEM_read_bio_X509": (c_void_p, [c_void_p, c_void_p, c_void_p, c_void_p]),
            "X509_free": (None, [c_void_p]),
            "X509_check_private_key": (c_int, [c_void_p, c_void_p]),
            "X509_REQ_new": (c_void_p, []),
            "X509_REQ_free": (None, [c_void_p]),
            "X509_REQ_set_version": (c_int, [c_void_p, c_long]),
            "X509_REQ_set_pubkey": (c_int, [c_void_p, c_void_p]),
            "X509_REQ_sign": (c_int, [c_void_p, c_void_p, c_void_p]),
            "i2d_X509_REQ": (c_int, [c_void_p, POINTER(c_void_p)]),
            "EVP_sha256": (c_void_p, []),
            "EVP_MD_CTX_new": (c_void_p, []),
            "EVP_MD_CTX_free": (None, [c_void_p]),
            "EVP_DigestSignInit": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p, c_void_p]),
            "EVP_DigestSign": (
                c_int,
                [c_void_p, c_void_p, POINTER(c_size_t), c_void_p, c_size_t],
            ),
        }
        for name, (restype, argtypes) in sigs.items():
            try:
                fn = getattr(lib, name)
            except AttributeError as exc:
                raise AgentError(
                    f"OpenSSL at {path} lacks {name}: the agent needs OpenSSL 3"
                ) from exc
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)
        if lib.OpenSSL_version_num() < 0x30000000:
            raise AgentError(f"OpenSSL at {path} is older than 3.0: the agent needs OpenSSL 3")

    def fail(self, what: str) -> AgentError:
        """An error naming ``what`` and OpenSSL's reason (its error queue is emptied)."""
        reasons = []
        while code := self.lib.ERR_get_error():
            buf = ctypes.create_string_buffer(256)
            self.lib.ERR_error_string_n(code, buf, len(buf))
            reasons.append(buf.value.decode("ascii", "replace"))
        return AgentError(
            f"OpenSSL: {what} failed" + (f": {'; '.join(reasons)}" if reasons else "")
        )

    def bio_bytes(self, bio: int) -> bytes:
        size = int(self.lib.BIO_ctrl(bio, _BIO_CTRL_PENDING, 0, None))
        buf = ctypes.create_string_buffer(max(size, 1))
        got = self.lib.BIO_read(bio, buf, size) if size else 0
        return buf.raw[: max(got, 0)]


_LIB: _Lib | None = None


def _lib() -> _Lib:
    global _LIB
    if _LIB is None:
        _LIB = _Lib()
    return _LIB


def openssl_version() -> int:
    """``OpenSSL_version_num()`` of the library in use (raises AgentError if unusable)."""
    return int(_lib().lib.OpenSSL_version_num())


def csr_pem_of_der(der: bytes) -> str:
    body = base64.b64encode(der).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + "\n".join(lines)
        + "\n-----END CERTIFICATE REQUEST-----\n"
    )


def _read_pem(o: _Lib, pem: bytes, reader: str, what: str) -> int:
    """The object libcrypto's ``reader`` (a ``PEM_read_bio_*``) makes of ``pem``, through a
    memory BIO; AgentError naming ``what`` when it cannot. The caller frees it."""
    lib = o.lib
    lib.ERR_clear_error()
    buf = ctypes.create_string_buffer(pem, len(pem))
    bio = lib.BIO_new_mem_buf(buf, len(pem))
    if not bio:
        raise o.fail("BIO_new_mem_buf")
    try:
        found = getattr(lib, reader)(bio, None, None, None)
    finally:
        lib.BIO_free(bio)
    if not found:
        raise o.fail(what)
    return int(found)


class EcKey:
    """An EC P-256 private key held by OpenSSL (freed by :meth:`close`; never in a repr)."""

    __slots__ = ("_pkey",)

    def __init__(self, pkey: int) -> None:
        self._pkey: int | None = pkey

    def __repr__(self) -> str:
        return "EcKey(P-256)"

    def _ptr(self) -> int:
        if self._pkey is None:
            raise AgentError("the key was closed")
        return self._pkey

    def close(self) -> None:
        if self._pkey is not None:
            _lib().lib.EVP_PKEY_free(self._pkey)
            self._pkey = None

    def __del__(self) -> None:
        if self._pkey is not None and _LIB is not None:
            _LIB.lib.EVP_PKEY_free(self._pkey)
            self._pkey = None

    def __enter__(self) -> EcKey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ making, loading
    @classmethod
    def generate(cls) -> EcKey:
        """A new P-256 key from OpenSSL's random generator."""
        o = _lib()
        lib = o.lib
        lib.ERR_clear_error()
        ctx = lib.EVP_PKEY_CTX_new_from_name(None, b"EC", None)
        if not ctx:
            raise o.fail("EVP_PKEY_CTX_new_from_name(EC)")
        try:
            pkey = c_void_p()
            if lib.EVP_PKEY_keygen_init(ctx) != 1:
                raise o.fail("EVP_PKEY_keygen_init")
            if lib.EVP_PKEY_CTX_set_group_name(ctx, b"P-256") != 1:
                raise o.fail("EVP_PKEY_CTX_set_group_name(P-256)")
            if lib.EVP_PKEY_generate(ctx, ctypes.byref(pkey)) != 1 or not pkey.value:
                raise o.fail("EVP_PKEY_generate")
            return cls(pkey.value)
        finally:
            lib.EVP_PKEY_CTX_free(ctx)

    @classmethod
    def from_pem(cls, pem: bytes) -> EcKey:
        """The key of a PKCS #8 (or SEC1) PEM; AgentError when it is not a P-256 key."""
        o = _lib()
        lib = o.lib
        pkey = _read_pem(o, pem, "PEM_read_bio_PrivateKey", "reading the private key")
        key = cls(pkey)
        if lib.EVP_PKEY_get_base_id(pkey) != _EVP_PKEY_EC or lib.EVP_PKEY_get_bits(pkey) != 256:
            key.close()
            raise AgentError("the private key is not an EC P-256 key")
        return key

    def private_pem(self) -> bytes:
        """The key as unencrypted PKCS #8 PEM (for the proxy's own files only)."""
        o = _lib()
        lib = o.lib
        lib.ERR_clear_error()
        bio = lib.BIO_new(lib.BIO_s_mem())
        if not bio:
            raise o.fail("BIO_new")
        try:
            if lib.PEM_write_bio_PrivateKey(bio, self._ptr(), None, None, 0, None, None) != 1:
                raise o.fail("PEM_write_bio_PrivateKey")
            return o.bio_bytes(bio)
        finally:
            lib.BIO_free(bio)

    # ------------------------------------------------------------------ using
    def csr_der(self) -> bytes:
        """A CSR (DER) for this key: empty subject, no extensions, signed with SHA-256."""
        o = _lib()
        lib = o.lib
        lib.ERR_clear_error()
        req = lib.X509_REQ_new()
        if not req:
            raise o.fail("X509_REQ_new")
        try:
            if lib.X509_REQ_set_version(req, 0) != 1:
                raise o.fail("X509_REQ_set_version")
            if lib.X509_REQ_set_pubkey(req, self._ptr()) != 1:
                raise o.fail("X509_REQ_set_pubkey")
            if lib.X509_REQ_sign(req, self._ptr(), lib.EVP_sha256()) <= 0:
                raise o.fail("X509_REQ_sign")
            size = lib.i2d_X509_REQ(req, None)
            if size <= 0:
                raise o.fail("i2d_X509_REQ")
            buf = ctypes.create_string_buffer(size)
            out = c_void_p(ctypes.addressof(buf))
            if lib.i2d_X509_REQ(req, ctypes.byref(out)) != size:
                raise o.fail("i2d_X509_REQ")
            return buf.raw
        finally:
            lib.X509_REQ_free(req)

    def sign(self, message: bytes) -> bytes:
        """ECDSA over SHA-256 of ``message`` (DER-encoded signature)."""
        o = _lib()
        lib = o.lib
        lib.ERR_clear_error()
        md = lib.EVP_MD_CTX_new()
        if not md:
            raise o.fail("EVP_MD_CTX_new")
        try:
            if lib.EVP_DigestSignInit(md, None, lib.EVP_sha256(), None, self._ptr()) != 1:
                raise o.fail("EVP_DigestSignInit")
            data = ctypes.create_string_buffer(message, len(message))
            size = c_size_t(0)
            if lib.EVP_DigestSign(md, None, ctypes.byref(size), data, len(message)) != 1:
                raise o.fail("EVP_DigestSign")
            sig = ctypes.create_string_buffer(size.value)
            if lib.EVP_DigestSign(md, sig, ctypes.byref(size), data, len(message)) != 1:
                raise o.fail("EVP_DigestSign")
            return sig.raw[: size.value]
        finally:
            lib.EVP_MD_CTX_free(md)

    def matches_certificate(self, cert_pem: bytes) -> bool:
        """Whether the first certificate of ``cert_pem`` carries this key's public key."""
        o = _lib()
        lib = o.lib
        cert = _read_pem(o, cert_pem, "PEM_read_bio_X509", "reading the certificate")
        try:
            return bool(lib.X509_check_private_key(cert, self._ptr()) == 1)
        finally:
            lib.X509_free(cert)
            lib.ERR_clear_error()
