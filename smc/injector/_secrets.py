"""Per-pod Secrets for the proxies' bootstrap credentials, and their garbage collection.

Role: with :class:`BootstrapSecrets` the webhook keeps a proxy's bootstrap key out of the pod
spec: :meth:`~BootstrapSecrets.store` writes the certificate, key and trust bundle into a
Secret ``smc-bootstrap-<hash of the admission uid>`` of the pod's namespace (type Opaque,
label ``smc.dev/bootstrap=true``, the identity and the certificate's not-after as
annotations), as the two file-based SDS files Envoy watches; the pod gets the Secret's name in
its ``smc.dev/bootstrap-secret`` annotation and mounts it. A retried review (same uid)
rewrites the same Secret. :meth:`~BootstrapSecrets.renew` re-issues the credentials of
Secrets with a third of their lifetime left, in place: the kubelet swaps the mounted files and
the running proxy reloads them, so a reconnect to the control plane after the first
certificate's end still succeeds. The pod does not exist yet at admission (no uid for an owner reference), so
:meth:`~BootstrapSecrets.collect` deletes every bootstrap Secret older than a grace period
that no pod of its namespace names in that annotation: the pod was deleted, or its creation
failed after the webhook answered. The webhook runs it periodically.

Concurrency: blocking ``kubernetes`` client calls; the webhook runs them in worker threads.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509

from smc.injector._bootstrap import watched_tls_files
from smc.injector._errors import InjectorError
from smc.injector._mutate import ANNOTATION_BOOTSTRAP_SECRET, BootstrapCredentials
from smc.injector._tls import renewal_due

__all__ = [
    "ANNOTATION_IDENTITY",
    "ANNOTATION_NOT_AFTER",
    "BOOTSTRAP_LABEL",
    "BootstrapSecrets",
    "bootstrap_secret_name",
]

log = logging.getLogger("smc.injector")

BOOTSTRAP_LABEL = "smc.dev/bootstrap"
ANNOTATION_IDENTITY = "smc.dev/identity"
ANNOTATION_NOT_AFTER = "smc.dev/not-after"


def bootstrap_secret_name(request_uid: str) -> str:
    """The Secret name for the review ``request_uid`` (stable across retries of it)."""
    return "smc-bootstrap-" + hashlib.sha256(request_uid.encode()).hexdigest()[:20]


class BootstrapSecrets:
    """Stores bootstrap credentials in Secrets and collects the orphaned ones."""

    def __init__(
        self,
        api_client: Any,
        *,
        grace: timedelta = timedelta(minutes=10),
        lifetime: timedelta = timedelta(hours=24),
    ) -> None:
        """``lifetime``: of the certificates stored (renewed with a third of it left)."""
        from kubernetes import client

        self._core: Any = client.CoreV1Api(api_client)
        self.grace = grace
        self.lifetime = lifetime

    def _listed(self) -> list[Any]:
        """Every bootstrap Secret of the cluster (by label)."""
        found = self._core.list_secret_for_all_namespaces(label_selector=f"{BOOTSTRAP_LABEL}=true")
        return list(found.items or [])

    def renew(
        self,
        issue: Callable[[str, str], BootstrapCredentials],
        *,
        now: datetime | None = None,
    ) -> list[str]:
        """Re-issue (``issue(namespace, service_account)``) the credentials of every bootstrap
        Secret with less than a third of :attr:`lifetime` left, in place: the kubelet updates
        the mounted files and the proxy reloads them. Returns the renewed ``namespace/name``;
        a Secret whose annotations are unreadable or whose renewal fails is logged and skipped.
        """
        from kubernetes.client.exceptions import ApiException

        now = now or datetime.now(UTC)
        renewed: list[str] = []
        for secret in self._listed():
            meta = secret.metadata
            annotations = meta.annotations or {}
            where = f"{meta.namespace}/{meta.name}"
            try:
                not_after = datetime.fromisoformat(annotations[ANNOTATION_NOT_AFTER])
                ns, _, sa = annotations[ANNOTATION_IDENTITY].partition("/")
            except (KeyError, ValueError) as exc:
                log.warning("bootstrap Secret %s: unreadable annotations (%s); skipped", where, exc)
                continue
            if not renewal_due(not_after, lifetime=self.lifetime, now=now):
                continue
            try:
                self.store(
                    namespace=meta.namespace,
                    name=meta.name,
                    identity=f"{ns}/{sa}",
                    credentials=issue(ns, sa),
                )
            except (InjectorError, ApiException) as exc:
                log.warning("bootstrap Secret %s: renewal failed: %s", where, exc)
                continue
            renewed.append(where)
        if renewed:
            log.info("renewed %d bootstrap Secret(s): %s", len(renewed), renewed)
        return renewed

    def store(
        self, *, namespace: str, name: str, identity: str, credentials: BootstrapCredentials
    ) -> None:
        """Create (or, for a retried review, replace) Secret ``namespace/name``."""
        from kubernetes.client.exceptions import ApiException

        not_after = x509.load_pem_x509_certificate(
            credentials.cert_pem.encode("ascii")
        ).not_valid_after_utc
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "labels": {BOOTSTRAP_LABEL: "true", "app.kubernetes.io/managed-by": "smc"},
                "annotations": {
                    ANNOTATION_IDENTITY: identity,
                    ANNOTATION_NOT_AFTER: not_after.isoformat(),
                },
            },
            "stringData": watched_tls_files(
                cert_pem=credentials.cert_pem,
                key_pem=credentials.key_pem,
                ca_pem=credentials.ca_pem,
            ),
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
        by_ns: dict[str, list[Any]] = {}
        for secret in self._listed():
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
