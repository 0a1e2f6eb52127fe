"""``smc vm bootstrap NAME``: the files an Envoy on a VirtualMachine needs to join the mesh.

Role: rebuilds the registry, policy and certificate projections from the log (``--log``), finds
the VirtualMachine ``--namespace/NAME`` (an unknown one is a clear error, exit 1), appends a
one-time join token for its proxy (``JoinTokenIssued``: the token's SHA-256, never the token;
valid for ``--lifetime``), and writes into ``--out`` the Envoy bootstrap (``bootstrap.yaml``: node
id ``<ns>/<name>``, ADS over gRPC to ``--ads``, mTLS with the certificate of the VM's SMC agent
unless ``--plaintext``), ``ca.pem`` (the mesh trust bundle recorded on the log, or the roots of
``--ca`` before any is recorded), ``join-token`` (mode 0600) and ``run-envoy.sh``, which starts
the agent (it makes the VM's key on the VM and sends a CSR to ``--ca-address``) and then Envoy
(see :func:`smc.injector.write_vm_bootstrap`). No key is written.
Concurrency: one command per process, on the main thread.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from smc.ca import format_spiffe_id
from smc.cli._app import cli, open_log_from
from smc.cli._certs import ca_options, factory_from_ca_options
from smc.cli._output import emit, output_option
from smc.identity import join_token_event
from smc.injector import (
    find_vm,
    parse_ads_address,
    vm_node_id,
    write_vm_bootstrap,
)
from smc.projections import CertsProjection, PolicyProjection, ProjectionRunner, RegistryProjection

__all__ = ["vm_group"]

_DURATION = re.compile(r"^(\d+)([smhd])$")


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``24h``, ``7d`` -> a positive timedelta."""
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise click.BadParameter(f"{text!r} is not a duration like 30m, 24h or 7d")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
    return timedelta(**{unit: int(m.group(1))})


@cli.group("vm")
def vm_group() -> None:
    """VirtualMachines in the mesh: bootstrap their Envoy."""


@vm_group.command("bootstrap")
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True, help="The VM's namespace.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory to write (created mode 0700). Default: ./smc-vm-NAMESPACE-NAME.",
)
@click.option(
    "--ads",
    default="127.0.0.1:15010",
    show_default=True,
    help="HOST:PORT of the control plane's ADS server, as the VM reaches it.",
)
@click.option("--ads-server-name", default=None, help="SNI and required DNS SAN of the ADS server.")
@click.option(
    "--plaintext", is_flag=True, help="No TLS to the ADS server (certificates are still written)."
)
@click.option(
    "--delta", is_flag=True, help="Incremental (delta) xDS instead of state of the world."
)
@click.option("--admin-port", default=15000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--install-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the files will live on the VM (default: the --out directory).",
)
@click.option(
    "--lifetime",
    default="24h",
    show_default=True,
    help="How long the one-time join token stays valid (the VM's agent uses it once).",
)
@click.option(
    "--ca-address",
    default=None,
    help="HOST:PORT of the control plane's certificate service (smc serve --ca-listen), as "
    "the VM reaches it. Default: the --ads host, port 15012.",
)
@ca_options
@output_option()
@click.pass_context
def bootstrap_cmd(
    ctx: click.Context,
    name: str,
    namespace: str,
    out: str | None,
    ads: str,
    ads_server_name: str | None,
    plaintext: bool,
    delta: bool,
    admin_port: int,
    install_dir: str | None,
    lifetime: str,
    ca_address: str | None,
    ca: str | None,
    vault_role: str,
    vault_mount: str,
    vault_token_file: str | None,
    vault_ca_cert: str | None,
    output: str,
) -> None:
    """Write the Envoy bootstrap, trust bundle, one-time join token and run script of VM NAME
    (no key: the VM's SMC agent makes it on the VM)."""
    ads_addr = parse_ads_address(ads, field="--ads")
    cert_service = parse_ads_address(ca_address or f"{ads_addr.host}:15012", field="--ca-address")
    valid_for = parse_duration(lifetime)
    log_ = open_log_from(ctx)
    registry, policy, certs = RegistryProjection(), PolicyProjection(), CertsProjection()
    ProjectionRunner(log=log_, projections=[registry, policy, certs]).catch_up()
    vm = find_vm(registry.workloads, namespace=namespace, name=name)
    trust_domain = policy.mesh.trust_domain
    identity = format_spiffe_id(
        trust_domain=trust_domain, namespace=vm.namespace, service_account=vm.service_account
    )
    roots = [r for bundle in certs.trust.values() for r in bundle]
    if ca:
        factory = factory_from_ca_options(
            ca=ca,
            vault_role=vault_role,
            vault_mount=vault_mount,
            vault_token_file=vault_token_file,
            vault_ca_cert=vault_ca_cert,
        )
        assert factory is not None
        roots = roots or list(factory(trust_domain).trust_bundle())
    if not roots:
        raise click.UsageError(
            "no mesh trust bundle on the log yet: start `smc serve` (its CA records it) or "
            "name the CA with --ca"
        )
    token, event = join_token_event(
        proxy=f"vm/{vm.namespace}/{vm.name}", identity=identity, ttl=valid_for
    )
    log_.append([event])
    directory = Path(out) if out else Path(f"smc-vm-{namespace}-{name}")
    files = write_vm_bootstrap(
        workload=vm,
        node_id=vm_node_id(vm, registry.workloads),
        identity=identity,
        directory=directory,
        ads=ads_addr,
        ca_address=cert_service,
        ca_pem="".join(r if r.endswith("\n") else r + "\n" for r in dict.fromkeys(roots)),
        join_token=token,
        tls=not plaintext,
        install_dir=Path(install_dir) if install_dir else None,
        admin_port=admin_port,
        delta=delta,
        server_name=ads_server_name,
    )
    expires = event.expires_at.isoformat()
    data = {
        "virtualMachine": f"{vm.namespace}/{vm.name}",
        "nodeId": files.node_id,
        "identity": identity,
        "joinTokenSha256": event.token_sha256,
        "joinTokenExpires": expires,
        "files": [str(p) for p in (files.bootstrap, files.ca, files.token, files.run_script)],
        "run": str(files.run_script),
    }

    def table() -> None:
        click.echo(
            f"VirtualMachine {vm.namespace}/{vm.name}: node id {files.node_id}, identity {identity}"
        )
        click.echo(
            f"one-time join token (sha256 {event.token_sha256[:16]}...), valid until {expires}"
        )
        written_files(data)

    emit(data, output, table=table, names=lambda: [f"file/{p}" for p in data["files"]])


def written_files(data: dict[str, Any]) -> None:
    """The ``table`` tail of the commands that write a VM's files: each path, then how to
    start it (the token itself is never printed: only its file)."""
    for path in data["files"]:
        click.echo(f"  wrote {path}")
    click.echo(f"start it with: {data['run']}")
