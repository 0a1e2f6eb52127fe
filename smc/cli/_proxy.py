"""``smc proxy status``: the Envoy proxies connected to a running ``smc serve``.

Role: reads ``GET /debug/proxies`` of the server's HTTP API and prints one row per ADS stream
(node id, stream kind, the ACKed version of each type, whether a push is pending, the last
NACK), then the registered nodes that have no configuration and why; ``--json`` prints the
raw answer. It authenticates like every client (:meth:`smc.auth.ClientCredentials.for_server`:
``$SMC_TOKEN`` or the local credential file of that server) and needs the ``debug`` grant.
Concurrency: one blocking HTTP request.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import click

from smc.auth import ClientCredentials, CredentialError
from smc.cli._app import cli
from smc.cli._output import emit, output_option
from smc.errors import SMCError

__all__ = ["proxy"]

_TYPES = ("Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration", "Secret")
_SHORT = {"Cluster": "CDS", "ClusterLoadAssignment": "EDS", "Listener": "LDS",
          "RouteConfiguration": "RDS", "Secret": "SDS"}  # fmt: skip


class ProxyStatusError(SMCError):
    """The server could not be asked, or answered something else than the debug view."""


def fetch_status(server: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """``GET <server>/debug/proxies`` as parsed JSON; raises :class:`ProxyStatusError`."""
    url = server.rstrip("/") + "/debug/proxies"
    headers: dict[str, str] = {}
    context = None
    if url.startswith("https://"):
        try:
            creds = ClientCredentials.for_server(server)
        except CredentialError as exc:
            raise ProxyStatusError(str(exc)) from exc
        headers, context = creds.headers(), creds.ssl_context()
    try:
        req = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        raise ProxyStatusError(f"{url} answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ProxyStatusError(f"cannot reach {url}: {reason}") from exc
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ProxyStatusError(f"{url} did not answer JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("proxies"), list):
        raise ProxyStatusError(f"{url} did not answer the debug view of proxies")
    return data


def render_table(data: dict[str, Any]) -> str:
    """The plain-text table printed by ``smc proxy status``."""
    header = ["NODE", "KIND", *(_SHORT[t] for t in _TYPES), "LAST NACK"]
    rows = [header]
    for p in data["proxies"]:
        types = p.get("types", {})
        cells = []
        for t in _TYPES:
            st = types.get(t)
            if st is None:
                cells.append("-")
                continue
            acked = (st.get("acked_version") or "")[:8] or "none"
            cells.append(acked + ("*" if st.get("pending") else ""))
        nacks = [st["last_nack"] for st in types.values() if st.get("last_nack")]
        last = max(nacks, key=lambda n: n["at"]) if nacks else None
        nack = f"{last['type']}: {last['message'][:60]}" if last else "-"
        rows.append([p["node_id"], p["kind"], *cells, nack])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if not data["proxies"]:
        lines.append("(no proxy connected)")
    lines.append("versions: first 8 hex digits of the ACKed version; * = a push awaits its ACK")
    waiting = [n for n in data.get("nodes", []) if n.get("problem")]
    for n in waiting:
        lines.append(f"no config for {n['node_id']}: {n['problem']}")
    if not data.get("ready", True):
        lines.append("server not ready: projections are still catching up with the log")
    return "\n".join(lines)


@cli.group("proxy")
def proxy() -> None:
    """Inspect the Envoy proxies of a running control plane."""


@proxy.command("status")
@click.option(
    "--server",
    default="https://127.0.0.1:8470",
    show_default=True,
    envvar="SMC_SERVER",
    help="Base URL of the HTTP API of `smc serve` (env SMC_SERVER).",
)
@output_option(json_alias=True)
def status(server: str, output: str) -> None:
    """Connected proxies: ACKed version per type, pending pushes and the last NACK."""
    data = fetch_status(server)
    emit(
        data,
        output,
        table=lambda: click.echo(render_table(data)),
        names=lambda: [f"proxy/{p.get('node_id', p.get('node', ''))}" for p in _proxies(data)],
    )


def _proxies(data: Any) -> list[dict[str, Any]]:
    items = data.get("proxies", []) if isinstance(data, dict) else data
    return [p for p in items if isinstance(p, dict)] if isinstance(items, list) else []
