"""The CA's issuer from command-line options (``smc serve --ca local:DIR|vault:URL``).

Role: parses ``--ca`` and the Vault options into an :data:`IssuerFactory` (called with the
mesh config's trust domain) or an issuer; errors name the option.
Concurrency: pure; the issuers built are thread-safe.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from smc.ca._errors import CAStateError
from smc.ca._local import LocalIssuer
from smc.ca._model import Issuer
from smc.ca._retry import Backoff, retrying
from smc.ca._vault import VaultIssuer

#: Builds the issuer for a trust domain (the mesh config names it; it may change).
IssuerFactory = Callable[[str], Issuer]


# ---------------------------------------------------------------------- issuer options
def _vault_token(*, token: str | None, token_file: str | None, env: Mapping[str, str]) -> str:
    if token:
        return token
    if token_file:
        try:
            text = Path(token_file).read_text().strip()
        except OSError as exc:
            raise CAStateError(
                f"--vault-token-file {token_file}: cannot read ({exc.strerror})"
            ) from exc
        if not text:
            raise CAStateError(f"--vault-token-file {token_file}: file is empty")
        return text
    for name in ("VAULT_TOKEN", "BAO_TOKEN"):
        if env.get(name):
            return env[name]
    raise CAStateError(
        "--ca vault:URL needs a token: set VAULT_TOKEN (or BAO_TOKEN) or pass --vault-token-file"
    )


def issuer_factory_from_options(
    *,
    ca: str,
    vault_role: str = "smc-workload",
    vault_mount: str = "pki",
    vault_token: str | None = None,
    vault_token_file: str | None = None,
    vault_ca_cert: str | None = None,
    vault_timeout: float = 5.0,
    backoff: Backoff | None = None,
    env: Mapping[str, str] | None = None,
) -> IssuerFactory:
    """Parse ``--ca`` (``local:DIR`` or ``vault:URL``) and return ``trust_domain -> issuer``
    (wrapped in :func:`smc.ca.retrying`). The spec and the Vault token are checked now, so
    a bad option fails at start-up with a message naming it; the issuer itself is built
    when the trust domain is known (it comes from the mesh config on the log)."""
    kind, sep, rest = ca.partition(":")
    bo = backoff or Backoff(attempts=4, initial=0.2, maximum=2.0, deadline=10.0)
    if not sep or not rest:
        raise CAStateError(f"--ca {ca!r}: expected local:DIR or vault:URL")
    if kind == "local":
        directory = Path(rest).expanduser()

        def local(trust_domain: str) -> Issuer:
            return retrying(LocalIssuer(directory=directory, trust_domain=trust_domain), backoff=bo)

        return local
    if kind == "vault":
        if not rest.startswith(("http://", "https://")):
            raise CAStateError(f"--ca {ca!r}: the Vault URL must start with http:// or https://")
        token = _vault_token(
            token=vault_token, token_file=vault_token_file, env=os.environ if env is None else env
        )
        if vault_ca_cert is not None and not Path(vault_ca_cert).is_file():
            raise CAStateError(f"--vault-ca-cert {vault_ca_cert}: no such file")
        verify: bool | str = vault_ca_cert if vault_ca_cert is not None else True

        def vault(trust_domain: str) -> Issuer:
            return retrying(
                VaultIssuer(
                    url=rest,
                    token=token,
                    role=vault_role,
                    mount=vault_mount,
                    trust_domain=trust_domain,
                    verify=verify,
                    timeout=vault_timeout,
                ),
                backoff=bo,
            )

        return vault
    raise CAStateError(f"--ca {ca!r}: unknown kind {kind!r}; use local:DIR or vault:URL")


def issuer_from_options(
    *,
    ca: str,
    trust_domain: str,
    vault_role: str = "smc-workload",
    vault_mount: str = "pki",
    vault_token: str | None = None,
    vault_token_file: str | None = None,
    vault_ca_cert: str | None = None,
    backoff: Backoff | None = None,
    env: Mapping[str, str] | None = None,
) -> Issuer:
    """The issuer ``--ca`` names, for ``trust_domain``, wrapped in :func:`smc.ca.retrying`."""
    return issuer_factory_from_options(
        ca=ca,
        vault_role=vault_role,
        vault_mount=vault_mount,
        vault_token=vault_token,
        vault_token_file=vault_token_file,
        vault_ca_cert=vault_ca_cert,
        backoff=backoff,
        env=env,
    )(trust_domain)
