"""Open an event log from its URL: ``sqlite:///path`` or ``kafka://host:port[,host:port]``.

Role: the one place backends are picked. Concurrency: stateless.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from smc.events._errors import LogError
from smc.events._log import EventLog

__all__ = ["open_log"]


def open_log(url: str, *, create: bool = True) -> EventLog:
    """Open the log named by ``url``; raises :class:`LogError` naming a bad URL.

    ``create=False`` (read-only commands): a SQLite file that does not exist is an error
    naming it, never created."""
    if url.startswith("sqlite:///"):
        from smc.events._sqlite import SqliteLog

        path = url[len("sqlite:///") :]
        if not path:
            raise LogError(f"log URL {url!r}: missing file path (sqlite:///path/to/log.db)")
        return SqliteLog(path, create=create)
    if url.startswith("kafka://"):
        from smc.events._kafka import KafkaLog

        parsed = urlparse(url)
        if not parsed.netloc:
            raise LogError(f"log URL {url!r}: missing host:port (kafka://host:port)")
        prefix = parse_qs(parsed.query).get("prefix", [""])[0]
        from smc.events._kafka_security import kafka_options

        config, kept = kafka_options(parsed.query)
        return KafkaLog(parsed.netloc, topic_prefix=prefix, config=config or None, url_options=kept)
    raise LogError(f"log URL {url!r}: unknown scheme; use sqlite:///path or kafka://host:port")
