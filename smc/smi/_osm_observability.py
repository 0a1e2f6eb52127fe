"""Validation of ``MeshConfig.spec.observability`` (access logs and tracing).

Role: check the observability section of OSM's MeshConfig and return its canonical JSON with
defaults filled in; :mod:`smc.smi._parse` calls it while parsing a MeshConfig. Every problem is
reported with its field path.
Concurrency: pure functions over their arguments; safe everywhere.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from smc.smi._osm_common import _host, _spec_json
from smc.smi._reader import _join, _Reader

__all__ = ["DEFAULT_ACCESS_LOG_PATH", "observability_json"]

#: Where access logs go unless MeshConfig says otherwise.
DEFAULT_ACCESS_LOG_PATH = "/dev/stdout"


def observability_json(r: _Reader, value: object, path: str) -> str:
    """Validate ``MeshConfig.spec.observability`` and return its canonical JSON (defaults
    filled in): ``accessLog`` {enabled, format json|text, path, textFormat} and ``tracing``
    {enabled, provider zipkin|opentelemetry, address, port, endpoint, sampling percent}."""
    m = r.mapping(value, path, allowed=("accessLog", "tracing"))
    if m is None:
        return ""
    out: dict[str, Any] = {}
    ap = _join(path, "accessLog")
    if m.get("accessLog") is not None:
        am = r.mapping(m.get("accessLog"), ap, allowed=("enabled", "format", "path", "textFormat"))
        if am is not None:
            enabled = True
            if am.get("enabled") is not None:
                enabled = bool(r.boolean(am.get("enabled"), _join(ap, "enabled")))
            fmt = am.get("format") or "json"
            if fmt not in ("json", "text"):
                r.fail(_join(ap, "format"), f"must be json or text, got {fmt!r}")
            dest = DEFAULT_ACCESS_LOG_PATH
            if am.get("path") is not None:
                dest = r.string(am.get("path"), _join(ap, "path"), max_len=1024) or dest
                if not dest.startswith("/"):
                    r.fail(_join(ap, "path"), f"must be an absolute file path, got {dest!r}")
            access: dict[str, Any] = {"enabled": enabled, "format": fmt, "path": dest}
            if am.get("textFormat") is not None:
                text = r.string(am.get("textFormat"), _join(ap, "textFormat"), max_len=4096)
                if text is not None and fmt != "text":
                    r.fail(_join(ap, "textFormat"), "only applies when format is text")
                elif text is not None:
                    access["textFormat"] = text if text.endswith("\n") else text + "\n"
            out["accessLog"] = access
    tp = _join(path, "tracing")
    if m.get("tracing") is not None:
        tm = r.mapping(
            m.get("tracing"),
            tp,
            allowed=("enabled", "provider", "address", "port", "endpoint", "sampling"),
            required=("address", "port"),
        )
        if tm is not None:
            enabled = True
            if tm.get("enabled") is not None:
                enabled = bool(r.boolean(tm.get("enabled"), _join(tp, "enabled")))
            provider = tm.get("provider") or "zipkin"
            if provider not in ("zipkin", "opentelemetry"):
                r.fail(_join(tp, "provider"), f"must be zipkin or opentelemetry, got {provider!r}")
            address = tm.get("address")
            addr: str | None = None
            if isinstance(address, str):
                try:
                    addr = ipaddress.ip_address(address).compressed
                except ValueError:
                    addr = _host(r, address, _join(tp, "address"))
            elif address is not None:
                r.fail(_join(tp, "address"), "must be a host name or IP address")
            port = r.port(tm.get("port"), _join(tp, "port"))
            endpoint = "/api/v2/spans"
            if tm.get("endpoint") is not None:
                endpoint = r.string(tm.get("endpoint"), _join(tp, "endpoint")) or endpoint
                if not endpoint.startswith("/"):
                    r.fail(_join(tp, "endpoint"), f"must start with '/', got {endpoint!r}")
            sampling = 100.0
            raw = tm.get("sampling")
            if raw is not None:
                if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= 100:
                    r.fail(_join(tp, "sampling"), f"must be a percentage 0-100, got {raw!r}")
                else:
                    sampling = float(raw)
            out["tracing"] = {
                "enabled": enabled,
                "provider": provider,
                "address": addr,
                "port": port,
                "endpoint": endpoint,
                "sampling": sampling,
            }
    return _spec_json(out) if out else ""
