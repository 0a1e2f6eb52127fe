"""Writer credentials: a key and a mesh-CA certificate naming a log writer and its role.

Role: :func:`issue_writer` asks the mesh CA (any :class:`~smc.ca.Issuer`: the local CA or
Vault/OpenBao, whose PKI signs a CSR; the key is made here) for a certificate of
``spiffe://<trust-domain>/ns/smc-writers/sa/<role>.<name>`` and writes ``writer.key`` (0600),
``writer.crt`` (leaf and chain) and ``trust.pem`` (the CA roots a verifier needs) into a
directory. Rotation is issuing again (a new key, a new key id; older seals keep verifying
with the certificate they carried); revocation is :func:`smc.ca.Issuer.revoke` of the serial
plus the revocation file verifiers read (``--revoked``).
Concurrency: blocking; files are replaced atomically.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from smc.ca import Issuer
from smc.events import IntegrityError, WriterTrust, writer_identity

__all__ = ["issue_writer", "load_trust"]


def _write(path: Path, data: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def issue_writer(
    issuer: Issuer,
    *,
    trust_domain: str,
    role: str,
    name: str,
    directory: str | os.PathLike[str],
    lifetime: timedelta = timedelta(days=30),
) -> dict[str, str]:
    """Issue writer credentials into ``directory``; returns the public facts."""
    identity = writer_identity(trust_domain=trust_domain, role=role, name=name)
    cert = issuer.issue(identity=identity, lifetime=lifetime)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write(d / "writer.key", cert.private_key_pem, 0o600)
    chain = cert.chain_pem if cert.chain_pem.strip() else ""
    leaf_and_chain = cert.cert_pem.rstrip("\n") + "\n" + chain
    # only intermediates belong after the leaf: drop self-signed roots the chain may hold
    _write(d / "writer.crt", leaf_and_chain, 0o644)
    _write(d / "trust.pem", "".join(issuer.trust_bundle()), 0o644)
    return {
        "identity": identity,
        "serial": cert.serial,
        "not_after": cert.not_after.isoformat(),
        "issuer": cert.issuer,
        "fingerprint": cert.fingerprint,
    }


def load_trust(
    roots: str | os.PathLike[str], *, revoked: str | os.PathLike[str] | None = None
) -> WriterTrust:
    """Trust roots (PEM file) and, optionally, revoked writer serials: a JSON object
    ``{serial (hex, colons allowed): revoked-at ISO time}``."""
    gone: dict[int, datetime] = {}
    if revoked is not None:
        try:
            data = json.loads(Path(revoked).read_text())
            for serial, at in dict(data).items():
                t = datetime.fromisoformat(str(at).replace("Z", "+00:00"))
                gone[int(str(serial).replace(":", ""), 16)] = (
                    t if t.tzinfo else t.replace(tzinfo=UTC)
                )
        except (OSError, ValueError, TypeError) as exc:
            raise IntegrityError(f"revoked writers file {revoked}: {exc}") from exc
    return WriterTrust.from_file(str(roots), revoked=gone)
