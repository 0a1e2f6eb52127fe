"""``smc vm join --user-data FILE --instance-id ID``: a VM group instance bootstraps itself.

Role: runs on a new instance of a VirtualMachineGroup (from cloud-init, with the user data the
group controller put in the group's launch template and the instance id from the metadata
service). Offline: it reads the user data's ``SMC_*`` variables (group, join token, the
certificate service and ADS addresses, the mesh roots, the identity) and writes, like ``smc vm
bootstrap``, the Envoy bootstrap (node id ``<ns>/<group>-<instance id>``, ADS over mTLS with
the agent's certificate), ``ca.pem``, ``join-token`` (0600) and ``run-envoy.sh``, which starts
the SMC agent (it makes the key here and trades the token plus a CSR for the certificate) and
Envoy. No key is written: the agent makes it.
Concurrency: one command per process.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import click

from smc.cli._output import emit, output_option
from smc.cli._vm import vm_group, written_files
from smc.identity import parse_user_data
from smc.injector import parse_ads_address, write_vm_bootstrap
from smc.projections import Workload

__all__ = ["join_cmd"]

_NEEDED = (
    "SMC_GROUP",
    "SMC_JOIN_TOKEN",
    "SMC_CA_ADDRESS",
    "SMC_ADS_ADDRESS",
    "SMC_CA_BUNDLE",
    "SMC_IDENTITY",
)


@vm_group.command("join")
@click.option(
    "--user-data",
    "user_data",
    type=click.Path(dir_okay=False, exists=True),
    required=True,
    help="The instance's user data (as the cloud's metadata service gives it).",
)
@click.option("--instance-id", required=True, help="The instance's id at the cloud provider.")
@click.option(
    "--out", type=click.Path(file_okay=False), required=True, help="Directory to write (0700)."
)
@click.option("--admin-port", default=15000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--delta", is_flag=True, help="Incremental (delta) xDS.")
@output_option()
def join_cmd(
    user_data: str, instance_id: str, out: str, admin_port: int, delta: bool, output: str
) -> None:
    """Write the agent and Envoy files of this VM group instance from its user data."""
    data = parse_user_data(Path(user_data).read_text(errors="replace"))
    missing = [k for k in _NEEDED if not data.get(k)]
    if missing:
        raise click.UsageError(
            f"--user-data {user_data}: not SMC user data (missing {', '.join(missing)})"
        )
    ns, _, group = data["SMC_GROUP"].partition("/")
    sa = data["SMC_IDENTITY"].rsplit("/sa/", 1)[-1]
    try:
        roots = base64.b64decode(data["SMC_CA_BUNDLE"], validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise click.UsageError(f"--user-data {user_data}: SMC_CA_BUNDLE: {exc}") from exc
    from smc.informers import workload_name

    name = workload_name(group, instance_id)
    workload = Workload(
        kind="vm", namespace=ns, name=name, address="", service_account=sa, labels=(), ports=()
    )
    files = write_vm_bootstrap(
        workload=workload,
        node_id=f"{ns}/{name}",
        identity=data["SMC_IDENTITY"],
        directory=Path(out),
        ads=parse_ads_address(data["SMC_ADS_ADDRESS"], field="SMC_ADS_ADDRESS"),
        ca_address=parse_ads_address(data["SMC_CA_ADDRESS"], field="SMC_CA_ADDRESS"),
        ca_pem=roots,
        join_token=data["SMC_JOIN_TOKEN"],
        admin_port=admin_port,
        delta=delta,
    )
    facts = {
        "instance": instance_id,
        "group": f"{ns}/{group}",
        "nodeId": files.node_id,
        "identity": data["SMC_IDENTITY"],
        "files": [str(p) for p in (files.bootstrap, files.ca, files.token, files.run_script)],
        "run": str(files.run_script),
    }

    def table() -> None:
        click.echo(f"instance {instance_id} of {ns}/{group}: node id {files.node_id}")
        written_files(facts)

    emit(facts, output, table=table, names=lambda: [f"file/{p}" for p in facts["files"]])
