"""Kafka as a door: client security options of ``kafka://`` URLs, and SMC's ACLs.

Role: :func:`kafka_options` turns the query of a ``kafka://host:port?...`` URL into
librdkafka settings: ``security_protocol`` (``SASL_PLAINTEXT``, ``SASL_SSL``, ``SSL``),
``sasl_mechanism`` (``SCRAM-SHA-256``/``SCRAM-SHA-512``), ``sasl_username``,
``sasl_password_file`` (the password is read from that file: a URL is printed in logs, so a
password in it is refused), ``ssl_ca``, ``ssl_cert``, ``ssl_key`` (files, for SSL and mTLS),
and ``config=FILE`` (a ``key=value`` client properties file in librdkafka's names, secrets
included, for anything else). An unknown option is an error naming it. :func:`smc_acls` is the
ACL set that makes the log a guarded door: SMC's writer principals may produce (idempotently)
to, and read, the ``smc.*`` topics; integrators' principals may only read them (and use
consumer groups ``smc-reader-*``); with the broker's ``StandardAuthorizer`` and no other ACL,
nobody else may do either. :func:`apply_acls` creates them (``deploy/kafka/set_acls.py``).
Concurrency: pure functions and one blocking admin call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from smc.events._errors import LogError

__all__ = ["apply_acls", "kafka_options", "read_properties", "smc_acls"]

_SIMPLE = {
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_username": "sasl.username",
    "ssl_ca": "ssl.ca.location",
    "ssl_cert": "ssl.certificate.location",
    "ssl_key": "ssl.key.location",
}
_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")


def read_properties(path: str) -> dict[str, str]:
    """A ``key=value`` properties file (``#`` comments, blank lines ignored)."""
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LogError(f"kafka config file {path}: cannot read: {exc}") from exc
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise LogError(f"kafka config file {path}:{n}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def kafka_options(query: str) -> tuple[dict[str, str], dict[str, str]]:
    """(librdkafka settings, the options kept for the log's URL) of a ``kafka://`` query;
    ``prefix`` is left to the caller. Raises :class:`LogError` naming a bad option."""
    config: dict[str, str] = {}
    kept: dict[str, str] = {}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        value = values[-1]
        if key == "prefix":
            continue
        if key == "sasl_password":
            raise LogError(
                "kafka URL option sasl_password: a URL is printed in logs; put the password in "
                "a file and give sasl_password_file=PATH (or config=FILE)"
            )
        if key == "config":
            config.update(read_properties(value))
        elif key == "sasl_password_file":
            try:
                config["sasl.password"] = Path(value).read_text("utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise LogError(f"kafka URL option sasl_password_file={value}: {exc}") from exc
        elif key in _SIMPLE:
            if key == "security_protocol" and value.upper() not in _PROTOCOLS:
                raise LogError(
                    f"kafka URL option security_protocol: one of {', '.join(_PROTOCOLS)}"
                )
            if key == "sasl_mechanism" and value.upper() not in _MECHANISMS:
                raise LogError(f"kafka URL option sasl_mechanism: one of {', '.join(_MECHANISMS)}")
            config[_SIMPLE[key]] = value
        else:
            known = ", ".join(sorted([*_SIMPLE, "sasl_password_file", "config", "prefix"]))
            raise LogError(f"kafka URL option {key!r} is unknown (known: {known})")
        kept[key] = value
    return config, kept


def smc_acls(*, writers: Sequence[str], readers: Sequence[str], prefix: str = "smc.") -> list[Any]:
    """The ACL bindings of the module docstring (principals as ``User:NAME``)."""
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    allow = AclPermissionType.ALLOW
    out = []

    def bind(rtype: Any, name: str, pattern: Any, who: str, op: Any) -> None:
        out.append(AclBinding(rtype, name, pattern, who, "*", op, allow))

    for who in (*writers, *readers):
        for op in (AclOperation.READ, AclOperation.DESCRIBE):
            bind(ResourceType.TOPIC, prefix, ResourcePatternType.PREFIXED, who, op)
        bind(
            ResourceType.GROUP, "smc-reader-", ResourcePatternType.PREFIXED, who, AclOperation.READ
        )
    for who in writers:
        bind(ResourceType.TOPIC, prefix, ResourcePatternType.PREFIXED, who, AclOperation.WRITE)
        bind(
            ResourceType.BROKER,
            "kafka-cluster",
            ResourcePatternType.LITERAL,
            who,
            AclOperation.IDEMPOTENT_WRITE,
        )
    return out


def apply_acls(
    *,
    bootstrap: str,
    config: Mapping[str, str],
    writers: Sequence[str],
    readers: Sequence[str],
    prefix: str = "smc.",
    timeout: float = 30.0,
) -> int:
    """Create :func:`smc_acls` on the cluster (as an admin principal); returns how many."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": bootstrap, **config})
    bindings = smc_acls(writers=writers, readers=readers, prefix=prefix)
    try:
        for fut in admin.create_acls(bindings, request_timeout=timeout).values():
            fut.result()
    except KafkaException as exc:
        raise LogError(f"Kafka at {bootstrap}: creating ACLs failed: {exc}") from exc
    return len(bindings)
