"""``smc get``: the mesh's resources by kind, kubectl style.

Role: kinds with short names, an optional NAME, ``-n/--namespace``, ``-A``, ``-l`` selectors,
``--watch`` and ``-o table|json|yaml|name``; reads the projections rebuilt from the log, or the
server's API when one is configured (:mod:`smc.cli._client`). Never creates a log.
Concurrency: one command per process; everything runs on the main thread.
"""

from __future__ import annotations

import json
from typing import Any

import click
from click.shell_completion import CompletionItem
from rich.console import Console
from rich.table import Table

from smc.api import (
    meshconfig_view,
    policies_view,
    services_view,
    vmgroups_view,
    workloads_view,
)
from smc.cli._app import cli, open_log_from
from smc.cli._client import ApiClient, client_from
from smc.cli._output import emit, kind_alias, output_option, parse_selector, select
from smc.cli._watch import watch as follow_changes
from smc.projections import PolicyProjection, ProjectionRunner, RegistryProjection

#: OSM policy kinds shown by ``smc get`` (plural -> kind).
_OSM_GET = {
    "egresses": "Egress",
    "ingressbackends": "IngressBackend",
    "retries": "Retry",
    "upstreamtrafficsettings": "UpstreamTrafficSetting",
}
_GET_KINDS = (
    "services",
    "workloads",
    "policies",
    "traffictargets",
    "splits",
    "meshconfig",
    *_OSM_GET,
    "vmgroups",
    "virtualmachines",
    "httproutegroups",
    "tcproutes",
    "udproutes",
)
_SMI_GET = {"httproutegroups": "HTTPRouteGroup", "tcproutes": "TCPRoute", "udproutes": "UDPRoute"}


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _labels(m: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(m.items())) or "-"


def _complete_kind(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    return [CompletionItem(k) for k in _GET_KINDS if k.startswith(incomplete.lower())]


@cli.command("get")
@click.argument("what", metavar="KIND", shell_complete=_complete_kind)
@click.argument("name", required=False)
@click.option("-n", "--namespace", default=None, help="Only this namespace.")
@click.option(
    "-A", "--all-namespaces", is_flag=True, help="Every namespace (the default without -n)."
)
@click.option("-l", "--selector", default=None, help="Label selector (k=v,k!=v,k,!k,k in (a,b)).")
@click.option("-w", "--watch", is_flag=True, help="After listing, print each change as it lands.")
@output_option()
@click.pass_context
def get_cmd(
    ctx: click.Context,
    what: str,
    name: str | None,
    namespace: str | None,
    all_namespaces: bool,
    selector: str | None,
    watch: bool,
    output: str,
) -> None:
    """List mesh resources of one KIND (kinds and short names as kubectl: svc, tt, ts, vm...).

    NAME picks one (exit 1 when it does not exist); -n/--namespace, -A and -l filter; -o
    table|json|yaml|name; -w/--watch keeps printing changes until interrupted.
    """
    what = kind_alias(what, _GET_KINDS)
    if namespace is not None and all_namespaces:
        raise click.UsageError("-n/--namespace and -A/--all-namespaces exclude each other")
    if selector:
        parse_selector(selector)  # a bad selector fails before the log is opened
    client = client_from(ctx)
    if client is not None and watch:
        raise click.UsageError("-w/--watch follows the log itself: not with --server")
    registry, policy = RegistryProjection(), PolicyProjection()
    runner: ProjectionRunner | None = None
    if client is None:
        log = open_log_from(ctx)
        runner = ProjectionRunner(log=log, projections=[registry, policy])
        runner.catch_up()

    def current() -> Any:
        data = (
            _api_get_data(client, what) if client is not None else _get_data(what, registry, policy)
        )
        if isinstance(data, list):
            data = select(data, namespace=namespace, name=name, selector=selector)
        return data

    data = current()
    if name is not None and not data:
        where = f" in namespace {namespace!r}" if namespace else ""
        raise click.ClickException(f"{what} {name!r} not found{where}")
    if (
        name is not None
        and isinstance(data, list)
        and output in ("json", "yaml")
        and len(data) == 1
    ):
        emit(data[0], output, table=lambda: None)
    else:
        emit(
            data,
            output,
            table=lambda: _get_table(what, data),
            names=lambda: _get_names(what, data),
        )
    if watch:
        assert runner is not None
        follow_changes(what, runner, current, output)


def _get_names(what: str, data: Any) -> list[str]:
    if isinstance(data, dict):
        return [f"{what}/{data.get('resource') or 'mesh'}"]
    return [f"{what}/{i['namespace']}/{i['name']}" for i in data]


def _api_get_data(client: ApiClient, what: str) -> Any:
    """What :func:`_get_data` reads, from the server's API (``smc --server``)."""
    kinds = {
        "traffictargets": "TrafficTarget",
        "splits": "TrafficSplit",
        **_SMI_GET,
        **_OSM_GET,
    }
    route = {"virtualmachines": "workloads"}.get(what, what)
    if what in kinds:
        route = f"policies?kind={kinds[what]}"
    body = client.checked(f"/v1/{route}")
    data = body["items"] if isinstance(body, dict) and "items" in body else body
    if what == "virtualmachines":
        data = [w for w in data if w["kind"] == "vm"]
    return data


def _get_data(what: str, registry: RegistryProjection, policy: PolicyProjection) -> Any:
    data: Any
    if what == "virtualmachines":
        data = [w for w in workloads_view(registry) if w["kind"] == "vm"]
    elif what in _SMI_GET:
        data = policies_view(policy, kind=_SMI_GET[what])
    elif what == "services":
        data = services_view(registry)
    elif what == "workloads":
        data = workloads_view(registry)
    elif what == "policies":
        data = policies_view(policy)
    elif what == "traffictargets":
        data = policies_view(policy, kind="TrafficTarget")
    elif what == "splits":
        data = policies_view(policy, kind="TrafficSplit")
    elif what in _OSM_GET:
        data = policies_view(policy, kind=_OSM_GET[what])
    elif what == "vmgroups":
        data = vmgroups_view(registry, policy)
    else:
        data = meshconfig_view(policy)
    return data


def _get_table(what: str, data: Any) -> None:
    if what == "services":
        _table(
            "services",
            ["NAMESPACE", "NAME", "BACKING", "PORTS", "SELECTOR", "ENDPOINTS"],
            [
                [
                    s["namespace"],
                    s["name"],
                    s["backing"],
                    ",".join(f"{p['port']}/{p['protocol']}" for p in s["ports"]),
                    _labels(s["selector"]),
                    str(len(s["endpoints"])),
                ]
                for s in data
            ],
        )
    elif what in ("workloads", "virtualmachines"):
        _table(
            what,
            ["KIND", "NAMESPACE", "NAME", "ADDRESS", "IDENTITY", "LABELS"],
            [
                [
                    w["kind"],
                    w["namespace"],
                    w["name"],
                    w["address"],
                    w["identity"],
                    _labels(w["labels"]),
                ]
                for w in data
            ],
        )
    elif what == "vmgroups":
        _table(
            "VM groups",
            ["NAMESPACE", "NAME", "PROVIDER", "MEMBERS", "STATUS", "JOINED", "DRAINING", "REASON"],
            [
                [
                    g["namespace"],
                    g["name"],
                    g["provider"] or "-",
                    g["cloudGroup"] or _labels(g["selector"]),
                    g["status"],
                    str(g["joined"]),
                    str(g["draining"]),
                    g["reason"] or "-",
                ]
                for g in data
            ],
        )
    elif what == "meshconfig":
        _table(
            "mesh config",
            ["SETTING", "VALUE"],
            [[k, json.dumps(v)] for k, v in data.items() if k != "settings"],
        )
    elif what == "traffictargets":
        rows = []
        for r in data:
            spec = r["manifest"]["spec"]
            dest = spec["destination"]
            rows.append(
                [
                    r["namespace"],
                    r["name"],
                    f"{dest['namespace']}/{dest['name']}",
                    ",".join(f"{s['namespace']}/{s['name']}" for s in spec["sources"]),
                    ",".join(f"{x['kind']}/{x['name']}" for x in spec["rules"]),
                    r["status"],
                ]
            )
        _table(
            "traffic targets",
            ["NAMESPACE", "NAME", "DESTINATION", "SOURCES", "RULES", "STATUS"],
            rows,
        )
    elif what in _OSM_GET or what in _SMI_GET:
        _table(
            what,
            ["NAMESPACE", "NAME", "SPEC"],
            [
                [r["namespace"], r["name"], json.dumps(r["manifest"]["spec"], sort_keys=True)]
                for r in data
            ],
        )
    elif what == "splits":
        rows = []
        for r in data:
            spec = r["manifest"]["spec"]
            rows.append(
                [
                    r["namespace"],
                    r["name"],
                    spec["service"],
                    ",".join(f"{b['service']}={b['weight']}" for b in spec["backends"]),
                    ",".join(m["name"] for m in spec.get("matches", [])) or "-",
                    r["status"],
                ]
            )
        _table(
            "traffic splits",
            ["NAMESPACE", "NAME", "SERVICE", "BACKENDS", "MATCHES", "STATUS"],
            rows,
        )
    else:
        _table(
            "policies",
            ["KIND", "NAMESPACE", "NAME", "API VERSION", "STATUS"],
            [[r["kind"], r["namespace"], r["name"], r["apiVersion"], r["status"]] for r in data],
        )
