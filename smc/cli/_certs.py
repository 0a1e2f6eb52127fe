"""``smc certs list|show|rotate|revoke``: workload certificates as the log records them.

Role: ``list`` and ``show`` rebuild the certificate projection from the log (no issuer
needed). ``rotate`` and ``revoke`` act at the issuer named by ``--ca`` (``local:DIR`` or
``vault:URL``; Vault token from ``VAULT_TOKEN``/``BAO_TOKEN`` or ``--vault-token-file``)
and append ``CertificateRenewed`` / ``CertificateRevoked`` with the operator as actor
(``unix:LOGIN``, ``unix:LOGIN as NAME`` with ``--as``). ``rotate`` writes the new key only to ``--keys DIR`` (the key
directory ``smc serve`` uses), never to the log; without it the running control plane,
which then holds no key for the new certificate, renews it once more with its own key.
:func:`ca_options` is the set of issuer options, reusable by ``smc serve``.
Concurrency: one command per process, on the main thread.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

from smc.ca import (
    InvalidIdentity,
    InvalidSerial,
    IssuerFactory,
    IssuerRejected,
    KeyStore,
    certificate_event,
    issuer_factory_from_options,
    normalize_serial,
    parse_spiffe_id,
    revocation_event,
)
from smc.cli._app import cli, open_log_from
from smc.cli._output import emit, output_option
from smc.events import EventLog
from smc.projections import (
    CertRecord,
    CertsProjection,
    PolicyProjection,
    ProjectionRunner,
    RegistryProjection,
)

__all__ = ["ca_options", "certs_group", "factory_from_ca_options", "keys_option"]

F = TypeVar("F", bound=Callable[..., Any])
SOURCE = "smc-cli"


def ca_options(fn: F) -> F:
    """Click options naming the issuer: ``--ca``, ``--vault-role``, ``--vault-mount``,
    ``--vault-token-file``, ``--vault-ca-cert`` (each also from an ``SMC_*`` variable).
    Turn them into an issuer factory with :func:`factory_from_ca_options`."""
    options = [
        click.option(
            "--ca",
            envvar="SMC_CA",
            default=None,
            help=(
                "Issuer: local:DIR (CA key in DIR, mode 0600), vault:URL, or ephemeral "
                "(serve only: a local CA in a temporary directory) (env SMC_CA)."
            ),
        ),
        click.option(
            "--vault-role",
            envvar="SMC_VAULT_ROLE",
            default="smc-workload",
            show_default=True,
            help="Vault PKI role that signs workload CSRs.",
        ),
        click.option(
            "--vault-mount",
            envvar="SMC_VAULT_MOUNT",
            default="pki",
            show_default=True,
            help="Vault PKI mount.",
        ),
        click.option(
            "--vault-token-file",
            envvar="SMC_VAULT_TOKEN_FILE",
            type=click.Path(dir_okay=False),
            default=None,
            help="File holding the Vault token (default: env VAULT_TOKEN or BAO_TOKEN).",
        ),
        click.option(
            "--vault-ca-cert",
            envvar="SMC_VAULT_CA_CERT",
            type=click.Path(dir_okay=False),
            default=None,
            help="PEM CA bundle to verify Vault's TLS certificate.",
        ),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def keys_option(fn: F) -> F:
    """``--keys DIR`` (env ``SMC_KEYS_DIR``): the workload key directory (mode 0700)."""
    opt = click.option(
        "--keys",
        "keys_dir",
        envvar="SMC_KEYS_DIR",
        type=click.Path(file_okay=False),
        default=None,
        help="Workload key directory (mode 0700; keys 0600) shared with `smc serve`"
        " (env SMC_KEYS_DIR).",
    )
    return opt(fn)


def factory_from_ca_options(
    *,
    ca: str | None,
    vault_role: str,
    vault_mount: str,
    vault_token_file: str | None,
    vault_ca_cert: str | None,
) -> IssuerFactory | None:
    """The issuer factory the :func:`ca_options` describe (None without ``--ca``)."""
    if not ca:
        return None
    return issuer_factory_from_options(
        ca=ca,
        vault_role=vault_role,
        vault_mount=vault_mount,
        vault_token_file=vault_token_file,
        vault_ca_cert=vault_ca_cert,
    )


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _actor(given: str | None) -> str:
    """The operator writing to the log directly (``unix:LOGIN``; ``unix:LOGIN as NAME``)."""
    from smc.cli._client import operator_actor

    return operator_actor(given)


def _rebuild(log: EventLog) -> tuple[RegistryProjection, PolicyProjection, CertsProjection]:
    registry, policy, certs = RegistryProjection(), PolicyProjection(), CertsProjection()
    ProjectionRunner(log=log, projections=[registry, policy, certs]).catch_up()
    return registry, policy, certs


def _status(rec: CertRecord, now: datetime) -> str:
    if rec.status == "active" and rec.not_after <= now:
        return "expired"
    return rec.status


def _row(rec: CertRecord, now: datetime) -> dict[str, Any]:
    return {
        "identity": rec.identity,
        "serial": rec.serial,
        "not_before": rec.not_before.isoformat(),
        "not_after": rec.not_after.isoformat(),
        "issuer": rec.issuer,
        "fingerprint": rec.fingerprint,
        "status": _status(rec, now),
        "reason": rec.reason,
    }


def _table(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    for col in ("identity", "serial", "not after", "issuer", "status"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["identity"], r["serial"], r["not_after"], r["issuer"], r["status"])
    Console(width=200).print(table)


def _resolve_identity(text: str, certs: CertsProjection, trust_domain: str) -> str | None:
    """A SPIFFE URI, or ``ns/sa`` (matched in the mesh trust domain, then in any)."""
    if text.startswith("spiffe://"):
        parse_spiffe_id(text)
        return text
    ns, sep, sa = text.partition("/")
    if not sep or not ns or not sa or "/" in sa:
        return None
    preferred = f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}"
    if preferred in certs.certs:
        return preferred
    suffix = f"/ns/{ns}/sa/{sa}"
    for identity in sorted(certs.certs):
        if identity.endswith(suffix):
            return identity
    return preferred


def _find_serial(serial: str, certs: CertsProjection) -> CertRecord | None:
    for mine in certs.certs.values():
        rec = mine.get(serial)
        if rec is not None:
            return rec
    return None


@cli.group("certs")
def certs_group() -> None:
    """Workload certificates: list, show, rotate, revoke."""


_OUTPUT = output_option()


@certs_group.command("list")
@_OUTPUT
@click.option("--current", "only_current", is_flag=True, help="Only current certificates.")
@click.pass_context
def list_cmd(ctx: click.Context, output: str, only_current: bool) -> None:
    """Every certificate recorded on the log, with its status."""
    _, _, certs = _rebuild(open_log_from(ctx))
    now = datetime.now(UTC)
    records = certs.all_certs()
    if only_current:
        records = [r for r in records if certs.current.get(r.identity) == r.serial]
    rows = [_row(r, now) for r in records]
    emit(
        rows,
        output,
        table=lambda: _table(rows, f"{len(rows)} certificates ({len(certs.current)} current)"),
        names=lambda: [f"certificate/{r['serial']}" for r in rows],
    )


@certs_group.command("show")
@click.argument("identity_or_serial")
@_OUTPUT
@click.pass_context
def show_cmd(ctx: click.Context, identity_or_serial: str, output: str) -> None:
    """One identity's certificates (SPIFFE URI or ns/sa), or one certificate by serial."""
    _, policy, certs = _rebuild(open_log_from(ctx))
    now = datetime.now(UTC)
    text = identity_or_serial.strip()
    try:
        identity = _resolve_identity(text, certs, policy.mesh.trust_domain)
    except InvalidIdentity as exc:
        _fail(str(exc))
    data: dict[str, Any]
    if identity is not None:
        history = [r for r in certs.all_certs() if r.identity == identity]
        if not history:
            _fail(f"no certificate recorded for identity {identity}")
        cur = certs.current_cert(identity)
        data = {
            "identity": identity,
            "current": _row(cur, now) if cur is not None else None,
            "certificates": [_row(r, now) for r in history],
        }
    else:
        try:
            serial = normalize_serial(text)
        except InvalidSerial:
            _fail(
                f"{text!r} is neither an identity (spiffe://... or namespace/serviceaccount)"
                " nor a certificate serial (hex)"
            )
        rec = _find_serial(serial, certs)
        if rec is None:
            _fail(f"no certificate with serial {serial} on the log")
        data = {"identity": rec.identity, "current": None, "certificates": [_row(rec, now)]}
        if certs.current.get(rec.identity) == rec.serial:
            data["current"] = _row(rec, now)
    if output != "table":
        emit(
            data,
            output,
            table=lambda: None,
            names=lambda: [f"certificate/{r['serial']}" for r in data["certificates"]],
        )
        return
    cur_row = data["current"]
    click.echo(f"identity:    {data['identity']}")
    if cur_row is None:
        click.echo("current:     none")
    else:
        click.echo(f"current:     {cur_row['serial']} ({cur_row['status']})")
        click.echo(f"not before:  {cur_row['not_before']}")
        click.echo(f"not after:   {cur_row['not_after']}")
        click.echo(f"issuer:      {cur_row['issuer']}")
        click.echo(f"fingerprint: {cur_row['fingerprint']}")
    _table(data["certificates"], "history")


@certs_group.command("rotate")
@click.argument("identity")
@ca_options
@keys_option
@click.option("--as", "actor", default=None, help="Act as NAME (recorded as 'unix:LOGIN as NAME').")
@output_option()
@click.pass_context
def rotate_cmd(
    ctx: click.Context,
    /,
    identity: str,
    keys_dir: str | None,
    actor: str | None,
    output: str,
    **ca: Any,
) -> None:
    """Renew IDENTITY's certificate now (SPIFFE URI or ns/sa); appends CertificateRenewed."""
    factory = factory_from_ca_options(**ca)
    if factory is None:
        _fail("certs rotate needs the issuer: pass --ca local:DIR or --ca vault:URL (or SMC_CA)")
    log = open_log_from(ctx)
    _, policy, certs = _rebuild(log)
    try:
        uri = _resolve_identity(identity.strip(), certs, policy.mesh.trust_domain)
    except InvalidIdentity as exc:
        _fail(str(exc))
    if uri is None:
        _fail(f"{identity!r} is not an identity (spiffe://... or namespace/serviceaccount)")
    cur = certs.current_cert(uri)
    if cur is None:
        _fail(
            f"{uri} has no current certificate to rotate (the control plane issues one"
            " while the identity is in the registry)"
        )
    keystore = KeyStore(directory=keys_dir) if keys_dir else None
    issuer = factory(parse_spiffe_id(uri).trust_domain)
    lifetime = timedelta(seconds=max(1, policy.mesh.cert_lifetime_seconds))
    cert = issuer.issue(identity=uri, lifetime=lifetime)
    if keystore is not None:
        keystore.put(cert, durable=True)
    event = certificate_event(cert, previous_serial=cur.serial, source=SOURCE, actor=_actor(actor))
    log.append([event])
    done = {
        "identity": uri,
        "previousSerial": cur.serial,
        "serial": cert.serial,
        "notAfter": str(cert.not_after),
    }
    emit(
        done,
        output,
        table=lambda: click.echo(
            f"renewed {uri}: serial {cur.serial} -> {cert.serial} (until {cert.not_after})"
        ),
        names=lambda: [f"certificate/{cert.serial}"],
    )
    if keystore is None:
        click.echo(
            "note: no --keys directory: the new key was not kept, so a running control plane"
            " renews this certificate once more with a key of its own",
            err=True,
        )


@certs_group.command("revoke")
@click.argument("serial")
@click.option("--reason", default="revoked by operator", show_default=True)
@ca_options
@click.option("--as", "actor", default=None, help="Act as NAME (recorded as 'unix:LOGIN as NAME').")
@output_option()
@click.pass_context
def revoke_cmd(
    ctx: click.Context,
    /,
    serial: str,
    reason: str,
    actor: str | None,
    output: str,
    **ca: Any,
) -> None:
    """Revoke the certificate SERIAL at the issuer and append CertificateRevoked."""
    try:
        canon = normalize_serial(serial)
    except InvalidSerial as exc:
        _fail(str(exc))
    factory = factory_from_ca_options(**ca)
    if factory is None:
        _fail("certs revoke needs the issuer: pass --ca local:DIR or --ca vault:URL (or SMC_CA)")
    log = open_log_from(ctx)
    _, _, certs = _rebuild(log)
    rec = _find_serial(canon, certs)
    if rec is None:
        _fail(f"no certificate with serial {canon} on the log")
    if rec.status == "revoked":
        _revoked(output, canon, rec.identity, rec.reason, already=True)
        return
    issuer = factory(parse_spiffe_id(rec.identity).trust_domain)
    if issuer.name != rec.issuer:
        _fail(
            f"certificate {canon} was issued by {rec.issuer!r}, but --ca names issuer"
            f" {issuer.name!r}"
        )
    try:
        issuer.revoke(serial=canon)
    except IssuerRejected as exc:
        _fail(str(exc))
    log.append(
        [
            revocation_event(
                identity=rec.identity,
                serial=canon,
                reason=reason,
                source=SOURCE,
                actor=_actor(actor),
            )
        ]
    )
    _revoked(output, canon, rec.identity, reason, already=False)


def _revoked(output: str, serial: str, identity: str, reason: str, *, already: bool) -> None:
    data = {"serial": serial, "identity": identity, "reason": reason, "alreadyRevoked": already}
    emit(
        data,
        output,
        table=lambda: click.echo(
            f"{serial} ({identity}) is already revoked: {reason}"
            if already
            else f"revoked {serial} ({identity}): {reason}"
        ),
        names=lambda: [f"certificate/{serial}"],
    )
