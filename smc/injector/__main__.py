"""``python -m smc.injector``: run the sidecar-injecting admission webhook.

Role: builds the :class:`~smc.injector.InjectorConfig` from the command line, opens the local CA
(``--ca local:DIR``, the directory ``smc serve --ca local:DIR`` uses, for the trust domain
``--trust-domain``), issues the webhook's serving certificate (``--dns-name``/``--ip`` SANs) and
serves ``/mutate`` until SIGINT/SIGTERM, renewing that certificate with a third of its life
left. ``--register NAME`` writes the CA's trust bundle into
``clientConfig.caBundle`` of every webhook of the MutatingWebhookConfiguration ``NAME`` at start
(in-cluster credentials, or ``--kubeconfig``); ``--lookup-namespaces`` reads namespace labels
from the apiserver instead of trusting the configuration's ``namespaceSelector``.
``--credentials agent`` (the default) puts no credential in the pod: an SMC agent container
makes the proxy's key in the pod and proves the pod with its projected service-account token
(audience ``--token-audience``) to the certificate service ``--ca-address``; the webhook
issues nothing and needs no access to Secrets. The former modes that made a bootstrap key in
the webhook (``secret``: in a per-pod Secret; ``env``: inline in the pod spec) are refused: a
forged AdmissionReview must yield nothing secret (docs/identity.md).
Concurrency: one asyncio loop; see :class:`~smc.injector.WebhookServer`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from smc.ca import IssuedCertificate, LocalIssuer
from smc.errors import SMCError
from smc.injector._bootstrap import parse_ads_address
from smc.injector._errors import InjectorError
from smc.injector._mutate import AgentSidecar, InjectorConfig
from smc.injector._server import (
    NamespaceLabels,
    WebhookServer,
    assume_opted_in,
    kube_namespace_labels,
)
from smc.injector._tls import issue_serving_certificate, server_ssl_context

log = logging.getLogger("smc.injector")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m smc.injector", description=__doc__)
    p.add_argument("--listen", default="0.0.0.0:9443", help="HOST:PORT to serve on")
    p.add_argument("--ca", required=True, help="local:DIR, the local CA directory")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--ads", default="smc.smc-system.svc:15010", help="control plane HOST:PORT")
    p.add_argument("--ads-server-name", default=None, help="required DNS SAN of the ADS server")
    p.add_argument("--plaintext-ads", action="store_true", help="no TLS from proxies to ADS")
    p.add_argument("--dns-name", action="append", default=[], help="serving cert DNS SAN")
    p.add_argument("--ip", action="append", default=[], help="serving cert IP SAN")
    p.add_argument(
        "--proxy-image", default=InjectorConfig.__dataclass_fields__["proxy_image"].default
    )
    p.add_argument(
        "--init-image", default=InjectorConfig.__dataclass_fields__["init_image"].default
    )
    p.add_argument(
        "--init-install",
        default=InjectorConfig.__dataclass_fields__["init_install"].default,
        help="shell run before the iptables rules ('' when the init image has iptables)",
    )
    p.add_argument(
        "--credentials",
        default="agent",
        help="agent (the default and only mode): no credential in the pod: an SMC agent in the "
        "pod makes the proxy's key and proves the pod with its projected service-account "
        "token. The former 'secret' and 'env' modes (a key made by the webhook) are refused",
    )
    p.add_argument("--agent-image", default="smc:latest", help="image of the SMC agent")
    p.add_argument(
        "--ca-address",
        default="smc.smc-system.svc:15012",
        help="HOST:PORT of the control plane's certificate service (smc serve --ca-listen)",
    )
    p.add_argument("--token-audience", default="smc", help="audience of the pods' tokens")
    p.add_argument("--register", metavar="NAME", help="MutatingWebhookConfiguration to patch")
    p.add_argument("--lookup-namespaces", action="store_true")
    p.add_argument("--kubeconfig", default=None)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def _kube_client(kubeconfig: str | None) -> Any:
    from kubernetes import client
    from kubernetes import config as kube_config

    config: Any = kube_config
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    config.load_incluster_config()
    return client.ApiClient()


def register_ca_bundle(api_client: Any, *, name: str, bundle_pem: str) -> int:
    """Set ``caBundle`` of every webhook of MutatingWebhookConfiguration ``name``; returns
    how many webhooks were patched."""
    from kubernetes import client

    adm: Any = client.AdmissionregistrationV1Api(api_client)
    current = adm.read_mutating_webhook_configuration(name)
    encoded = base64.b64encode(bundle_pem.encode("ascii")).decode("ascii")
    hooks = [
        {"name": w.name, "clientConfig": {"caBundle": encoded}} for w in current.webhooks or []
    ]
    adm.patch_mutating_webhook_configuration(name, {"webhooks": hooks})
    return len(hooks)


async def _run(server: WebhookServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"smc injector: https://{server.host}:{server.port}/mutate", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.credentials != "agent":
        parser.error(
            f"--credentials {args.credentials!r} was removed: the webhook makes no key and puts "
            "no credential in a pod, a Secret or a patch; each pod's key is made in the pod by "
            "its SMC agent (omit the option or give --credentials agent; see docs/identity.md)"
        )
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2))
    try:
        kind, _, directory = args.ca.partition(":")
        if kind != "local" or not directory:
            raise InjectorError(f"--ca {args.ca!r}: expected local:DIR")
        host, _, port = args.listen.rpartition(":")
        if not host or not port.isdigit():
            raise InjectorError(f"--listen {args.listen!r} is not HOST:PORT")
        issuer = LocalIssuer(directory=directory, trust_domain=args.trust_domain)
        config = InjectorConfig(
            ads=parse_ads_address(args.ads, field="--ads"),
            proxy_image=args.proxy_image,
            init_image=args.init_image,
            init_install=args.init_install,
            trust_domain=args.trust_domain,
            tls=not args.plaintext_ads,
            ads_server_name=args.ads_server_name,
            agent=AgentSidecar(
                image=args.agent_image,
                ca_address=args.ca_address,
                ca_pem="".join(issuer.trust_bundle()),
                audience=args.token_audience,
                server_name=args.ads_server_name,
            ),
        )

        def reissue() -> IssuedCertificate:
            return issue_serving_certificate(
                issuer,
                dns_names=args.dns_name or ["smc-injector.smc-system.svc"],
                ip_addresses=args.ip,
            )

        serving = reissue()
        labels: NamespaceLabels = assume_opted_in
        api = None
        if args.register or args.lookup_namespaces:
            api = _kube_client(args.kubeconfig)
        if args.register:
            n = register_ca_bundle(
                api, name=args.register, bundle_pem="".join(issuer.trust_bundle())
            )
            log.warning("caBundle set on %d webhook(s) of %s", n, args.register)
        if args.lookup_namespaces:
            labels = kube_namespace_labels(api)
        server = WebhookServer(
            config=config,
            credentials=None,
            ssl_context=server_ssl_context(serving),
            namespace_labels=labels,
            host=host,
            port=int(port),
            serving=serving,
            reissue_serving=reissue,
        )
        asyncio.run(_run(server))
    except SMCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
