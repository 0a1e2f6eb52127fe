"""Per-pod Secrets for the proxies' bootstrap credentials, and their garbage collection.

Role: with :class:`BootstrapSecrets` the webhook keeps a proxy's bootstrap key out of the pod
spec: :meth:`~BootstrapSecrets.store` writes the certificate, key and trust bundle into a
Secret ``smc-bootstrap-<hash of the admission uid>`` of the pod's namespace (type Opaque,
label ``smc.dev/bootstrap=true``, the identity and the certificate's not-after as
annotations); the pod gets the Secret's name in its ``smc.dev/bootstrap-secret`` annotation and
its proxy reads the three values by ``secretKeyRef``. A retried review (same uid) rewrites the
same Secret. The pod does not exist yet at admission (no uid for an owner reference), so
:meth:`~BootstrapSecrets.collect` deletes every bootstrap Secret older than a grace period
that no pod of its namespace names in that annotation: the pod was deleted, or its creation
failed after the webhook answered. The webhook runs it periodically.

Concurrency: blocking ``kubernetes`` client calls; the webhook runs them in worker threads.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from smc.injector._errors import InjectorError
from smc.injector._mutate import (
    ANNOTATION_BOOTSTRAP_SECRET,
    ENV_CA,
    ENV_CERT,
    ENV_KEY,
    SECRET_KEYS,
    BootstrapCredentials,
)

__all__ = ["BOOTSTRAP_LABEL", "BootstrapSecrets", "bootstrap_secret_name"]

log = logging.getLogger("smc.injector")

BOOTSTRAP_LABEL = "smc.dev/bootstrap"


def bootstrap_secret_name(request_uid: str) -> str:
    """The Secret name for the review ``request_uid`` (stable across retries of it)."""
    return "smc-bootstrap-" + hashlib.sha256(request_uid.encode()).hexdigest()[:20]


class BootstrapSecrets:
    """Stores bootstrap credentials in Secrets and collects the orphaned ones."""

    def __init__(self, api_client: Any, *, grace: timedelta = timedelta(minutes=10)) -> None:
        from kubernetes import client

        self._core: Any = client.CoreV1Api(api_client)
        self.grace = grace

    def store(
        self, *, namespace: str, name: str, identity: str, credentials: BootstrapCredentials
    ) -> None:
        """Create (or, for a retried review, replace) Secret ``namespace/name``."""
        from kubernetes.client.exceptions import ApiException

        values = {
            ENV_CERT: credentials.cert_pem,
            ENV_KEY: credentials.key_pem,
            ENV_CA: credentials.ca_pem,
        }
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "labels": {BOOTSTRAP_LABEL: "true", "app.kubernetes.io/managed-by": "smc"},
                "annotations": {"smc.dev/identity": identity},
            },
            "stringData": {SECRET_KEYS[var]: value for var, value in values.items()},
        }
        try:
            self._core.create_namespaced_secret(namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise InjectorError(
                    f"cannot create Secret {namespace}/{name}: {exc.status} {exc.reason}"
                ) from None
            try:
                self._core.replace_namespaced_secret(name, namespace, body)
            except ApiException as again:
                raise InjectorError(
                    f"cannot replace Secret {namespace}/{name}: {again.status} {again.reason}"
                ) from None

    def collect(self, *, now: datetime | None = None) -> list[str]:
        """Delete bootstrap Secrets older than the grace period that no pod names; returns
        their ``namespace/name``. A failure on one namespace is logged and skipped."""
        from kubernetes.client.exceptions import ApiException

        now = now or datetime.now(UTC)
        found = self._core.list_secret_for_all_namespaces(label_selector=f"{BOOTSTRAP_LABEL}=true")
        by_ns: dict[str, list[Any]] = {}
        for secret in found.items or []:
            created = secret.metadata.creation_timestamp
            if created is not None and now - created < self.grace:
                continue
            by_ns.setdefault(secret.metadata.namespace, []).append(secret)
        deleted: list[str] = []
        for ns, secrets in sorted(by_ns.items()):
            try:
                pods = self._core.list_namespaced_pod(ns).items or []
                used = set(_referenced(pods))
                for secret in secrets:
                    name = secret.metadata.name
                    if name in used:
                        continue
                    try:
                        self._core.delete_namespaced_secret(name, ns)
                    except ApiException as exc:
                        if exc.status != 404:
                            raise
                    deleted.append(f"{ns}/{name}")
            except ApiException as exc:
                log.warning("bootstrap Secrets of %s: %s %s", ns, exc.status, exc.reason)
        if deleted:
            log.info("deleted %d orphaned bootstrap Secret(s): %s", len(deleted), deleted)
        return deleted


def _referenced(pods: Iterable[Any]) -> Iterable[str]:
    for pod in pods:
        annotations = (pod.metadata.annotations or {}) if pod.metadata is not None else {}
        name = annotations.get(ANNOTATION_BOOTSTRAP_SECRET)
        if name:
            yield name
