"""``smc apply``, ``smc delete``, ``smc get`` and ``smc policy check``: the declarative mesh API.

Role: kubectl-style commands. ``apply``/``delete`` read manifests from files, directories
(recursively: ``*.yaml``, ``*.yml``, ``*.json``) or stdin (``-``), rebuild the registry and policy
projections from the log, and append the changes through :class:`smc.api.MeshChanges` with the
actor recorded (``unix:USER``, ``unix:USER as NAME`` with ``--as``); with ``smc --server URL``
they go through the server's API instead (:mod:`smc.cli._client`). Each document is reported created /
configured / unchanged / deleted / error; valid documents apply even when others fail, and the
exit code is 1 if any failed. ``get`` and ``policy check`` read the projections only.
Concurrency: one command per process; everything runs on the main thread.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import click
from click.shell_completion import CompletionItem
from rich.console import Console
from rich.table import Table

from smc.api import (
    ChangeReport,
    MeshChanges,
    meshconfig_view,
    policies_view,
    policy_check,
    services_view,
    vmgroups_view,
    workloads_view,
)
from smc.cli._app import cli, open_log_from
from smc.cli._client import ApiClient, change_via_api, client_from, operator_actor
from smc.cli._output import emit, kind_alias, output_option, parse_selector, select
from smc.cli._watch import watch as follow_changes
from smc.events import EventLog, LogError, Position, SqliteLog
from smc.projections import PolicyProjection, ProjectionRunner, RegistryProjection
from smc.projections._policyview import PolicyView
from smc.smi import ManifestError, Resource, load_documents

__all__ = ["apply_cmd", "delete_cmd", "get_cmd", "policy_group", "read_manifests"]

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def read_manifests(paths: tuple[str, ...]) -> tuple[list[Resource], list[ManifestError]]:
    """Resources and errors from files, directories (recursive) and ``-`` (stdin)."""
    resources: list[Resource] = []
    errors: list[ManifestError] = []
    for given in paths:
        if given == "-":
            sources: list[tuple[str, Path | None]] = [("-", None)]
        else:
            p = Path(given)
            if p.is_dir():
                found = sorted(
                    f for f in p.rglob("*") if f.is_file() and f.suffix in MANIFEST_SUFFIXES
                )
                if not found:
                    errors.append(
                        ManifestError(
                            document=given,
                            path="",
                            reason="directory holds no *.yaml, *.yml or *.json file",
                        )
                    )
                sources = [(str(f), f) for f in found]
            else:
                sources = [(given, p)]
        for label, path in sources:
            try:
                if path is None:
                    text = sys.stdin.buffer.read().decode("utf-8")
                else:
                    text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(
                    ManifestError(document=label, path="", reason=f"not UTF-8 (byte {exc.start})")
                )
                continue
            except OSError as exc:
                errors.append(
                    ManifestError(document=label, path="", reason=f"cannot read: {exc.strerror}")
                )
                continue
            res = load_documents(text, source=label)
            resources.extend(res.resources)
            errors.extend(res.errors)
    return resources, errors


def _projections(log: EventLog) -> tuple[RegistryProjection, PolicyProjection]:
    registry, policy = RegistryProjection(), PolicyProjection()
    ProjectionRunner(log=log, projections=[registry, policy]).catch_up()
    return registry, policy


def _projections_at(
    log: EventLog, at: str | None, trust: str | None
) -> tuple[RegistryProjection, PolicyProjection]:
    from smc.audit import load_trust, state_at
    from smc.cli._app import parse_position
    from smc.events import ChainVerifier
    from smc.projections import CheckpointDir

    verifier = ChainVerifier(trust=load_trust(trust)) if trust else None
    history = os.environ.get("SMC_CHECKPOINTS")
    runner = state_at(
        log,
        parse_position(log, at) if at else log.end_position(),
        verifier=verifier,
        checkpoints=CheckpointDir(history) if history else None,
    )
    registry = next(p for p in runner.projections if isinstance(p, RegistryProjection))
    policy = next(p for p in runner.projections if isinstance(p, PolicyProjection))
    return registry, policy


def _print_report(report: ChangeReport, *, output: str, dry_run: bool) -> None:
    if output in ("json", "yaml"):
        emit(report.as_dict(), output, table=lambda: None)
        return
    if output == "name":  # as kubectl apply -o name: one kind/namespace/name per document
        for r in report.results:
            if r.errors:
                for e in r.errors:
                    click.echo(f"error: {e}", err=True)
            else:
                click.echo(r.document.lower())
        return
    suffix = " (dry run)" if dry_run else ""
    for r in report.results:
        if r.errors:
            for e in r.errors:
                click.echo(f"error: {e}", err=True)
        else:
            click.echo(f"{r.document} {r.status}{suffix}")
            for w in r.warnings:
                click.echo(f"warning: {r.document}: {w}", err=True)


def _change(
    ctx: click.Context,
    *,
    verb: str,
    files: tuple[str, ...],
    actor: str | None,
    request_id: str | None,
    dry_run: bool,
    output: str,
    ignore_not_found: bool = False,
) -> None:
    client = client_from(ctx)
    if client is not None:  # through the server's API, as the caller's credential
        ok = change_via_api(
            client,
            verb=verb,
            files=files,
            actor=actor,
            request_id=request_id,
            dry_run=dry_run,
            output=output,
            ignore_not_found=ignore_not_found,
        )
        if not ok:
            sys.exit(1)
        return
    resources, errors = read_manifests(files)
    log = _log_for_change(ctx, verb=verb, dry_run=dry_run)
    registry, policy = _projections(log)
    changes = MeshChanges(log=log, registry=registry, policy=policy)
    who = operator_actor(actor)
    rid = request_id or str(uuid.uuid4())
    if verb == "apply":
        plan = changes.plan_apply(
            resources, actor=who, source="cli", request_id=rid, load_errors=errors
        )
    else:
        plan = changes.plan_delete(
            resources,
            actor=who,
            source="cli",
            request_id=rid,
            load_errors=errors,
            ignore_not_found=ignore_not_found,
        )
    if dry_run:
        report = ChangeReport(plan=plan, appended=(), target=Position())
    else:
        report = changes.commit(plan)
    _print_report(report, output=output, dry_run=dry_run)
    if not plan.results:
        click.echo("error: no objects passed to " + verb, err=True)
        sys.exit(1)
    if not report.ok:
        sys.exit(1)


def _log_for_change(ctx: click.Context, *, verb: str, dry_run: bool) -> EventLog:
    """The log to plan against: ``apply`` creates a missing one; a dry run or a delete never
    does (with no log, a dry run plans against an empty mesh in memory)."""
    try:
        return open_log_from(ctx, create=verb == "apply" and not dry_run)
    except LogError:
        url = ctx.obj["log_url"]
        if not (dry_run and url.startswith("sqlite:///")):
            raise
    scratch = tempfile.TemporaryDirectory(prefix="smc-dry-run-")
    ctx.call_on_close(scratch.cleanup)
    empty = SqliteLog(Path(scratch.name) / "empty.db")
    ctx.call_on_close(empty.close)
    return empty


_FILE_OPT = click.option(
    "-f",
    "--filename",
    "files",
    multiple=True,
    required=True,
    help="Manifest file, directory (recursive) or - for stdin; repeatable.",
)
_AS_OPT = click.option(
    "--as",
    "actor",
    default=None,
    help="Act as NAME (impersonation: recorded with your own principal, as 'you as NAME'; "
    "through --server it needs the impersonate grant).",
)
_RID_OPT = click.option(
    "--request-id", default=None, help="Idempotency key (a retry with it applies once)."
)
_DRY_OPT = click.option("--dry-run", is_flag=True, help="Show what would change; append nothing.")
_OUT_OPT = output_option()


@cli.command("apply")
@_FILE_OPT
@_AS_OPT
@_RID_OPT
@_DRY_OPT
@_OUT_OPT
@click.pass_context
def apply_cmd(
    ctx: click.Context,
    files: tuple[str, ...],
    actor: str | None,
    request_id: str | None,
    dry_run: bool,
    output: str,
) -> None:
    """Create or update mesh resources from manifests (like kubectl apply)."""
    _change(
        ctx,
        verb="apply",
        files=files,
        actor=actor,
        request_id=request_id,
        dry_run=dry_run,
        output=output,
    )


@cli.command("delete")
@_FILE_OPT
@_AS_OPT
@_RID_OPT
@_DRY_OPT
@_OUT_OPT
@click.option("--ignore-not-found", is_flag=True, help="Missing resources are not an error.")
@click.pass_context
def delete_cmd(
    ctx: click.Context,
    files: tuple[str, ...],
    actor: str | None,
    request_id: str | None,
    dry_run: bool,
    output: str,
    ignore_not_found: bool,
) -> None:
    """Delete the mesh resources named by manifests (like kubectl delete -f)."""
    _change(
        ctx,
        verb="delete",
        files=files,
        actor=actor,
        request_id=request_id,
        dry_run=dry_run,
        output=output,
        ignore_not_found=ignore_not_found,
    )


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


@cli.group("policy")
def policy_group() -> None:
    """Query the policy in force."""


def _identity(value: str, name: str) -> str:
    ns, sep, sa = value.partition("/")
    if not sep or not ns or not sa or "/" in sa:
        raise click.BadParameter(f"{value!r} is not namespace/serviceaccount", param_hint=name)
    return value


@policy_group.command("check")
@click.option("--from", "source", required=True, help="Source identity ns/serviceaccount.")
@click.option("--to", "destination", required=True, help="Destination identity ns/sa.")
@click.option("--path", default=None, help="HTTP path (implies HTTP).")
@click.option("--method", default=None, help="HTTP method (implies HTTP).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Destination port.")
@output_option()
@click.option("--at", "at", default=None, help="Answer as of this TIME or log position.")
@click.option(
    "--trust",
    envvar="SMC_TRUST",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help="Only records whose seals verify against these PEM roots count.",
)
@click.pass_context
def policy_check_cmd(
    ctx: click.Context,
    source: str,
    destination: str,
    path: str | None,
    method: str | None,
    port: int | None,
    output: str,
    at: str | None,
    trust: str | None,
) -> None:
    """Print allow or deny for traffic from one identity to another (now, or --at a past point)."""
    _identity(source, "--from")
    _identity(destination, "--to")
    if at is not None or trust is not None:
        registry, policy = _projections_at(open_log_from(ctx), at, trust)
    else:
        registry, policy = _projections(open_log_from(ctx))
    result = policy_check(
        PolicyView(registry=registry, policy=policy),
        source=source,
        destination=destination,
        path=path,
        method=method,
        port=port,
    )
    emit(
        result,
        output,
        table=lambda: click.echo(f"{result['decision']}: {result['reason']}"),
        names=lambda: [str(result["decision"])],
    )
    if result["decision"] != "allow":
        sys.exit(1)  # as `kubectl auth can-i`: scripts can test the answer
