"""Join tokens of VirtualMachineGroups: instances of a cloud group bootstrap themselves.

Role: a group join token is a random token (256 bits) whose ``JoinTokenIssued`` record names
the group (``proxy = "vmgroup/<ns>/<group>"``), the identity its instances run as and a short
expiry; only its SHA-256 is on the log. The group controller makes one, hands it to the cloud
provider for the group's user data (:func:`join_user_data`; an Auto Scaling group's launch
template) and makes a fresh one when half its life is gone. A booting instance's agent
presents it with a CSR over TLS (proof kind ``join-token``, as for a single VM);
:func:`check_group_join` then accepts it only when:

- it is not expired (``join-token-expired``);
- the node id names a current member of *that* group: a VM workload the provider reported,
  labelled ``smc.dev/vm-group: <group>`` in the token's namespace (``join-token-other-group``,
  ``workload-gone``), that is not draining (``workload-draining``);
- that instance never got a certificate with a group token before (``join-token-replayed``:
  the use is the ``ProxyCertificateIssued`` whose proof is ``group-join-token:<digest>``, on
  the log, so every replica agrees; an instance renews with its certificate afterwards);
- the group still runs as the token's identity (``identity-changed``).

So a token is scoped to one group, short-lived, and single-use per instance: a copy taken
from the user data is worthless once its instance joined or the token expired, and cannot
admit a machine the cloud does not list in the group.
Concurrency: pure functions over projections (call on the loop that applies events).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import datetime, timedelta

from smc.ca import SpiffeId
from smc.events import JoinTokenIssued
from smc.identity._errors import ProofRefused
from smc.identity._join import join_token_event
from smc.projections import CertsProjection, RegistryProjection
from smc.projections._certs import JoinToken
from smc.projections._vmgroups import DRAINING_LABEL, GROUP_LABEL
from smc.smi import VirtualMachineGroup

__all__ = [
    "GROUP_PROOF",
    "GROUP_TOKEN_PREFIX",
    "GroupJoinTokens",
    "check_group_join",
    "group_join_token_event",
    "join_user_data",
    "parse_user_data",
]

#: ``JoinTokenIssued.proxy`` of a group token: ``vmgroup/<ns>/<group>``.
GROUP_TOKEN_PREFIX = "vmgroup/"
#: Proof recorded on the certificate an instance got with a group token.
GROUP_PROOF = "group-join-token"


def group_join_token_event(
    *,
    namespace: str,
    group: str,
    identity: str,
    ttl: timedelta,
    actor: str = "vm-group-controller",
    now: datetime | None = None,
) -> tuple[str, JoinTokenIssued]:
    """``(token, event)`` for group ``namespace/group`` whose instances run as ``identity``
    (a SPIFFE URI): append the event, put the token only in the group's user data."""
    return join_token_event(
        proxy=f"{GROUP_TOKEN_PREFIX}{namespace}/{group}",
        identity=identity,
        ttl=ttl,
        actor=actor,
        now=now,
        source="vm-group-controller",
        id_kind="group-join-token",
    )


def check_group_join(
    *,
    token: JoinToken,
    proxy: str,
    registry: RegistryProjection,
    certs: CertsProjection,
    now: datetime,
    spiffe_of: Callable[[str], str],
) -> tuple[str, str]:
    """``(identity ns/sa, proof)`` for instance ``proxy`` (canonical ``vm/<ns>/<name>``)
    presenting group token ``token``; raises :class:`ProofRefused` (see module docstring)."""
    if now >= token.expires_at:
        raise ProofRefused(
            kind="join-token-expired", reason=f"expired at {token.expires_at.isoformat()}"
        )
    _, gns, gname = token.proxy.split("/", 2)
    _, ns, name = proxy.split("/", 2)
    w = registry.workloads.get(("vm", ns, name))
    if w is None:
        raise ProofRefused(
            kind="workload-gone", reason=f"{ns}/{name} is not an instance the provider lists"
        )
    labels = dict(w.labels)
    if ns != gns or labels.get(GROUP_LABEL) != gname:
        raise ProofRefused(
            kind="join-token-other-group",
            reason=f"this token is for VirtualMachineGroup {gns}/{gname}; {ns}/{name} is not "
            "one of its instances",
        )
    if labels.get(DRAINING_LABEL) == "true":
        raise ProofRefused(kind="workload-draining", reason=f"{ns}/{name} is leaving the mesh")
    for rec in certs.proxy_certs.get(proxy, {}).values():
        if rec.proof.startswith(GROUP_PROOF + ":"):
            raise ProofRefused(
                kind="join-token-replayed",
                reason=f"{ns}/{name} already joined with a join token (serial {rec.serial}); "
                "renew with its certificate",
            )
    identity = f"{ns}/{w.service_account}"
    if spiffe_of(identity) != token.identity:
        raise ProofRefused(
            kind="identity-changed",
            reason=f"the group now runs as {identity}, not as the token's identity",
        )
    return identity, f"{GROUP_PROOF}:{token.token_sha256}"


def join_user_data(
    *,
    namespace: str,
    group: str,
    token: str,
    expires_at: datetime,
    ca: str,
    ads: str,
    ca_bundle_pem: str = "",
    identity: str = "",
) -> str:
    """The user data an instance of the group boots with (a shell fragment of variables its
    agent reads): the group, the token, where the certificate service and ADS are, and the
    mesh roots (base64 PEM) it verifies the certificate service with."""
    bundle = base64.b64encode(ca_bundle_pem.encode()).decode() if ca_bundle_pem else ""
    return (
        "#!/bin/sh\n"
        f"# SMC: instance of VirtualMachineGroup {namespace}/{group}\n"
        f"SMC_GROUP={namespace}/{group}\n"
        f"SMC_JOIN_TOKEN={token}\n"
        f"SMC_JOIN_TOKEN_EXPIRES={expires_at.isoformat()}\n"
        f"SMC_CA_ADDRESS={ca}\n"
        f"SMC_ADS_ADDRESS={ads}\n"
        f"SMC_CA_BUNDLE={bundle}\n"
        f"SMC_IDENTITY={identity}\n"
    )


class GroupJoinTokens:
    """Join tokens for the group controller (``VmGroupController(join_tokens=...)``):
    instances are told to reach the certificate service at ``ca`` and ADS at ``ads``."""

    def __init__(self, *, ca: str, ads: str, ca_bundle: Callable[[], str] = lambda: "") -> None:
        self.ca = ca
        self.ads = ads
        self.ca_bundle = ca_bundle
        self._identity: dict[tuple[str, str], str] = {}

    def make(
        self, group: VirtualMachineGroup, *, trust_domain: str
    ) -> tuple[str, JoinTokenIssued, datetime]:
        identity = SpiffeId.of(
            trust_domain=trust_domain,
            namespace=group.namespace,
            service_account=group.service_account,
        ).uri
        self._identity[(group.namespace, group.name)] = identity
        token, event = group_join_token_event(
            namespace=group.namespace,
            group=group.name,
            identity=identity,
            ttl=timedelta(seconds=group.join_token_seconds),
        )
        return token, event, event.expires_at

    def user_data(self, group: VirtualMachineGroup, token: str, expires_at: datetime) -> str:
        return join_user_data(
            namespace=group.namespace,
            group=group.name,
            token=token,
            expires_at=expires_at,
            ca=self.ca,
            ads=self.ads,
            ca_bundle_pem=self.ca_bundle(),
            identity=self._identity.get((group.namespace, group.name), ""),
        )


def parse_user_data(text: str) -> dict[str, str]:
    """The ``SMC_*`` variables of :func:`join_user_data` output."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("SMC_"):
            out[key] = value.strip()
    return out
