"""The mutating admission webhook: AdmissionReview v1 over HTTPS, answered with a JSONPatch.

Role: :func:`parse_review` checks an ``admission.k8s.io/v1`` ``AdmissionReview`` body and
returns its request (raising :class:`InvalidAdmissionReview` naming the field at fault, with
the request uid when it was readable); :func:`review_response` builds the answer
(``response.uid`` = the request's uid, ``allowed``, and a base64 ``JSONPatch`` or a status
message). :class:`WebhookServer` serves ``POST /mutate`` (and ``GET /healthz``) with aiohttp
over TLS: a pod CREATE in an opted-in namespace gets the sidecar (:func:`smc.injector.mutate`)
with a bootstrap certificate issued for the pod's identity (with :class:`BootstrapSecrets`
stored in a per-pod Secret, skipped for a ``dryRun`` review, and orphaned Secrets collected
periodically; else inline in the pod spec); every other request is allowed unchanged. A body that is not an AdmissionReview gets HTTP 400 with a JSON ``{"error": ...}``
message; a readable review whose pod cannot be injected gets ``allowed: false`` with the
reason (code 400 for a bad pod, 500 when the CA fails). Nothing a client sends makes it crash.
Namespace labels come from a :data:`NamespaceLabels` lookup (the apiserver, through
:func:`kube_namespace_labels`, or :func:`assume_opted_in` when the webhook configuration's
``namespaceSelector`` already filters).
Concurrency: one asyncio loop (aiohttp); certificate issuing and Kubernetes reads run in worker
threads (``asyncio.to_thread``), so slow ones do not stall other reviews.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from smc.ca import CAError, IssuedCertificate, Issuer, format_spiffe_id
from smc.injector._errors import InjectorError, InvalidAdmissionReview, InvalidPod
from smc.injector._mutate import (
    NAMESPACE_LABEL,
    BootstrapCredentials,
    InjectorConfig,
    injection_decision,
    mutate,
    pod_identity,
)
from smc.injector._secrets import BootstrapSecrets, bootstrap_secret_name
from smc.injector._tls import load_serving_certificate, renewal_due

__all__ = [
    "API_VERSION",
    "AdmissionRequest",
    "CredentialSource",
    "NamespaceLabels",
    "WebhookServer",
    "assume_opted_in",
    "issuer_credentials",
    "kube_namespace_labels",
    "parse_review",
    "review_response",
]

log = logging.getLogger("smc.injector")

API_VERSION = "admission.k8s.io/v1"
#: Namespace name -> its labels (awaited once per review that may inject).
NamespaceLabels = Callable[[str], Awaitable[Mapping[str, str]]]
#: (namespace, service account) -> bootstrap credentials; blocking (run in a worker thread).
CredentialSource = Callable[[str, str], BootstrapCredentials]
_MAX_BODY = 8 * 1024 * 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class AdmissionRequest:
    """The parts of ``AdmissionReview.request`` the injector reads."""

    uid: str
    kind: str
    group: str
    operation: str
    namespace: str
    obj: Any
    dry_run: bool = False


def _field(req: Mapping[str, Any], key: str, uid: str | None) -> Any:
    if key not in req or req[key] is None:
        raise InvalidAdmissionReview(f"request.{key} is missing", uid)
    return req[key]


def parse_review(body: bytes) -> AdmissionRequest:
    """Check an AdmissionReview v1 body; raises :class:`InvalidAdmissionReview` (with the
    request uid when it could be read)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidAdmissionReview(f"body is not JSON: {exc}", None) from None
    if not isinstance(doc, dict):
        raise InvalidAdmissionReview(
            f"body: expected a JSON object (AdmissionReview), got {type(doc).__name__}", None
        )
    if doc.get("apiVersion") != API_VERSION:
        raise InvalidAdmissionReview(
            f"apiVersion: expected {API_VERSION!r}, got {doc.get('apiVersion')!r}", None
        )
    if doc.get("kind") != "AdmissionReview":
        raise InvalidAdmissionReview(
            f"kind: expected 'AdmissionReview', got {doc.get('kind')!r}", None
        )
    req = doc.get("request")
    if not isinstance(req, dict):
        raise InvalidAdmissionReview("request is missing or not an object", None)
    uid = req.get("uid")
    if not isinstance(uid, str) or not uid:
        raise InvalidAdmissionReview("request.uid is missing or not a string", None)
    kind = _field(req, "kind", uid)
    if not isinstance(kind, dict) or not isinstance(kind.get("kind"), str):
        raise InvalidAdmissionReview("request.kind: expected {group, version, kind}", uid)
    operation = _field(req, "operation", uid)
    if not isinstance(operation, str):
        raise InvalidAdmissionReview("request.operation: expected a string", uid)
    namespace = req.get("namespace") or ""
    if not isinstance(namespace, str):
        raise InvalidAdmissionReview("request.namespace: expected a string", uid)
    obj = req.get("object")
    if operation in ("CREATE", "UPDATE") and obj is None:
        raise InvalidAdmissionReview(f"request.object is missing for a {operation}", uid)
    dry_run = req.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise InvalidAdmissionReview("request.dryRun: expected a boolean", uid)
    return AdmissionRequest(
        uid=uid,
        kind=kind["kind"],
        group=str(kind.get("group") or ""),
        operation=operation,
        namespace=namespace,
        obj=obj,
        dry_run=dry_run,
    )


def review_response(
    uid: str,
    *,
    patch: list[dict[str, Any]] | None = None,
    denied: str | None = None,
    code: int = 400,
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    """An AdmissionReview v1 answer: allowed with ``patch`` (if any), or denied with a reason."""
    response: dict[str, Any] = {"uid": uid, "allowed": denied is None}
    if denied is not None:
        response["status"] = {"code": code, "message": denied, "status": "Failure"}
    elif patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(patch, separators=(",", ":")).encode()
        ).decode("ascii")
    if warnings:
        response["warnings"] = warnings
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


async def assume_opted_in(namespace: str) -> Mapping[str, str]:
    """For a webhook whose ``namespaceSelector`` already requires ``smc.dev/inject=enabled``."""
    del namespace
    return {NAMESPACE_LABEL: "enabled"}


def kube_namespace_labels(api_client: Any) -> NamespaceLabels:
    """Read a namespace's labels from the apiserver (``kubernetes`` client, in a thread)."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)

    async def labels(namespace: str) -> Mapping[str, str]:
        ns: Any = await asyncio.to_thread(core.read_namespace, namespace)
        return dict(ns.metadata.labels or {}) if ns.metadata is not None else {}

    return labels


def issuer_credentials(
    issuer: Issuer, *, trust_domain: str, config: InjectorConfig
) -> CredentialSource:
    """Bootstrap credentials issued by ``issuer`` for ``spiffe://<td>/ns/<ns>/sa/<sa>``, valid
    for ``config.bootstrap_lifetime``, with the issuer's trust bundle."""

    def issue(namespace: str, service_account: str) -> BootstrapCredentials:
        uri = format_spiffe_id(
            trust_domain=trust_domain, namespace=namespace, service_account=service_account
        )
        cert = issuer.issue(identity=uri, lifetime=config.bootstrap_lifetime)
        return BootstrapCredentials(
            cert_pem=cert.cert_pem,
            key_pem=cert.private_key_pem,
            ca_pem="".join(issuer.trust_bundle()),
        )

    return issue


class WebhookServer:
    """``POST /mutate`` over HTTPS on ``host:port`` (port 0: a free one, see :attr:`port`)."""

    def __init__(
        self,
        *,
        config: InjectorConfig,
        credentials: CredentialSource | None,
        ssl_context: ssl.SSLContext,
        namespace_labels: NamespaceLabels = assume_opted_in,
        host: str = "127.0.0.1",
        port: int = 0,
        secrets: BootstrapSecrets | None = None,
        gc_interval: float = 300.0,
        serving: IssuedCertificate | None = None,
        reissue_serving: Callable[[], IssuedCertificate] | None = None,
    ) -> None:
        """With ``secrets``, bootstrap credentials go into per-pod Secrets (not the pod
        spec); every ``gc_interval`` seconds orphaned ones are collected and those with a
        third of their life left renewed. With ``serving`` (the certificate in
        ``ssl_context``) and ``reissue_serving``, the serving certificate is renewed the same
        way, in the same context (new handshakes get it; no restart, same caBundle)."""
        self.config = config
        self.secrets = secrets
        self.gc_interval = gc_interval
        self.serving = serving
        self._reissue_serving = reissue_serving
        self._gc: asyncio.Task[None] | None = None
        self._credentials = credentials
        self._ssl = ssl_context
        self._labels = namespace_labels
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self.reviews = 0
        self.injected = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_post("/mutate", self._mutate)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def start(self) -> int:
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self._ssl)
        await site.start()
        self._runner = runner
        if self.port == 0:  # the port the system chose
            self.port = int(runner.addresses[0][1])
        if self.secrets is not None or (self.serving and self._reissue_serving):
            self._gc = asyncio.create_task(self._maintain())
        log.info("admission webhook on https://%s:%d/mutate", self.host, self.port)
        return self.port

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.gc_interval)
            try:
                await self.renew_serving()
            except Exception:  # the CA may be away; try again next round
                log.exception("renewing the webhook's serving certificate failed")
            if self.secrets is None:
                continue
            try:
                await asyncio.to_thread(self.secrets.collect)
                if self._credentials is not None:
                    await asyncio.to_thread(self.secrets.renew, self._credentials)
            except Exception:  # the apiserver may be away; try again next round
                log.exception("collecting or renewing bootstrap Secrets failed")

    async def renew_serving(self, *, now: datetime | None = None) -> bool:
        """Re-issue the serving certificate when a third of its life is left; True if done."""
        current, reissue = self.serving, self._reissue_serving
        if current is None or reissue is None:
            return False
        now = now or datetime.now(UTC)
        if not renewal_due(
            current.not_after, lifetime=current.not_after - current.not_before, now=now
        ):
            return False
        fresh = await asyncio.to_thread(reissue)
        load_serving_certificate(self._ssl, fresh)
        self.serving = fresh
        log.info("webhook serving certificate renewed (serial %s)", fresh.serial)
        return True

    async def stop(self) -> None:
        if self._gc is not None:
            self._gc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gc
            self._gc = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        del request
        return web.Response(text="ok")

    async def _mutate(self, request: web.Request) -> web.Response:
        self.reviews += 1
        try:
            body = await request.read()
        except (web.HTTPException, ValueError, ConnectionError) as exc:
            return web.json_response({"error": f"cannot read the body: {exc}"}, status=400)
        try:
            req = parse_review(body)
        except InvalidAdmissionReview as exc:
            if exc.uid is None:
                return web.json_response({"error": str(exc)}, status=400)
            return web.json_response(review_response(exc.uid, denied=str(exc)))
        try:
            answer = await self.review(req)
        except Exception as exc:  # the reason goes back to the apiserver; the server lives on
            log.exception("review %s failed", req.uid)
            answer = review_response(req.uid, denied=f"injector error: {exc}", code=500)
        return web.json_response(answer)

    async def review(self, req: AdmissionRequest) -> dict[str, Any]:
        """The answer to one parsed request."""
        if req.kind != "Pod" or req.group != "" or req.operation != "CREATE":
            return review_response(req.uid)
        if not req.namespace:
            return review_response(req.uid, denied="request.namespace is missing for a Pod")
        try:
            labels = await self._labels(req.namespace)
            decision = injection_decision(req.obj, namespace_labels=labels)
            if not decision.inject:
                log.info("review %s: not injecting: %s", req.uid, decision.reason)
                return review_response(req.uid)
            ns, sa, _ = pod_identity(req.obj, namespace=req.namespace)
            creds = None
            if self.config.tls and self.config.agent is None:
                if self._credentials is None:
                    raise InjectorError("TLS bootstrap is on but the webhook has no CA")
                creds = await asyncio.to_thread(self._credentials, ns, sa)
                if self.secrets is not None:
                    creds = dataclasses.replace(creds, secret_name=bootstrap_secret_name(req.uid))
            patch = mutate(
                req.obj,
                namespace_labels=labels,
                config=self.config,
                namespace=req.namespace,
                credentials=creds,
            )
            if creds is not None and creds.secret_name and not req.dry_run and patch:
                assert self.secrets is not None
                await asyncio.to_thread(
                    self.secrets.store,
                    namespace=ns,
                    name=creds.secret_name,
                    identity=f"{ns}/{sa}",
                    credentials=creds,
                )
        except InvalidPod as exc:
            return review_response(req.uid, denied=f"smc injector: {exc}", code=400)
        except CAError as exc:
            return review_response(
                req.uid, denied=f"smc injector: bootstrap certificate: {exc}", code=500
            )
        self.injected += 1
        return review_response(req.uid, patch=patch)
