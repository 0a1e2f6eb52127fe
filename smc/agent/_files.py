"""Where an SMC agent keeps the proxy's certificate and key: files Envoy reads itself (SDS).

Role: the agent hands the proxy's key to its Envoy through Envoy's file-based SDS, not a
server: ``<proxy dir>/smc-sds/default.json`` holds one ``Secret`` named ``default`` (the
certificate chain and the private key, inline) as a ``DiscoveryResponse``, and Envoy reads
it with a ``path_config_source`` whose ``watched_directory`` is ``smc-sds``
(:func:`agent_sds_config`). The paths are relative: Envoy runs with the proxy dir as its
working directory (``workingDir`` of the injected Envoy container, ``cd`` in the VM's
``run-envoy.sh``), so every proxy gets the same listener configuration from the control
plane and still reads its own key. A renewal writes a new file beside it and renames it
over the old one (one atomic step: Envoy never pairs a new certificate with an old key; the
rename is the move Envoy's directory watch reloads on). The directory is mode 0750 and the
secret 0640, owned by the agent's user and group, which are also Envoy's (the proxy UID and
GID; the pending key is 0600): any other user can neither read nor list them. In a pod the proxy dir is an ``emptyDir`` of medium ``Memory``
(tmpfs): the key never touches a disk and never leaves the host; on a VM it is the
bootstrap's home directory, so a rebooted VM serves its certificate at once.

Beside the secret: ``certificate.json`` (0640, the last ``SignResponse``: no key; what the
resident agent schedules the next renewal by) and ``.pending-key.pem`` (a key whose CSR is
sent but not yet answered, kept so that a retry asks again with the same key) and
``join-token.spent`` (the SHA-256 of the join token a certificate was had with, as the log
records it, so that a restarted agent never presents a spent token again).
Stdlib only: the resident agent (:mod:`smc.agent.__main__`) imports this module and nothing
heavier.
Concurrency: plain blocking file operations; one writer (the agent) at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

__all__ = [
    "PENDING_KEY",
    "SDS_DIR",
    "SECRET_FILE",
    "SECRET_TYPE",
    "SPENT_JOIN_TOKEN",
    "STATUS_FILE",
    "WORKLOAD_SECRET",
    "agent_sds_config",
    "prepare_sds_dir",
    "read_secret",
    "read_status",
    "remove_private",
    "sds_dir",
    "secret_document",
    "write_pem_files",
    "write_private",
    "write_secret",
]

#: The directory (relative to Envoy's working directory, the proxy dir) Envoy watches.
SDS_DIR = "smc-sds"
SECRET_FILE = "default.json"
STATUS_FILE = "certificate.json"
PENDING_KEY = ".pending-key.pem"
#: The SHA-256 of the join token a certificate was had with (spent: never presented again).
SPENT_JOIN_TOKEN = "join-token.spent"
WORKLOAD_SECRET = "default"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def agent_sds_config() -> dict[str, Any]:
    """The SDS config source of ``default``: the agent's file, relative to Envoy's working
    directory, reloaded when a file is moved into ``smc-sds``."""
    return {
        "resource_api_version": "V3",
        "path_config_source": {
            "path": f"{SDS_DIR}/{SECRET_FILE}",
            "watched_directory": {"path": SDS_DIR},
        },
    }


def sds_dir(proxy_dir: Path) -> Path:
    return proxy_dir / SDS_DIR


def prepare_sds_dir(proxy_dir: Path) -> Path:
    """Create ``<proxy_dir>/smc-sds`` (0750) if needed and check it: a real directory owned by
    this user, not a symlink (another user must not be able to point it elsewhere)."""
    folder = sds_dir(proxy_dir)
    proxy_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o750)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{folder} is not a directory")
    if st.st_uid != os.geteuid():
        raise OSError(f"{folder} belongs to uid {st.st_uid}, not to this agent's {os.geteuid()}")
    os.chmod(folder, 0o750)
    return folder


def write_private(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``path`` (``mode``, 0600 by default) atomically: a new file beside it, synced,
    renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode & 0o600)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove_private(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def secret_document(*, chain_pem: str, key_pem: str) -> dict[str, Any]:
    """The ``DiscoveryResponse`` Envoy reads: the ``Secret`` ``default`` with both inline."""
    return {
        "resources": [
            {
                "@type": SECRET_TYPE,
                "name": WORKLOAD_SECRET,
                "tls_certificate": {
                    "certificate_chain": {"inline_string": chain_pem},
                    "private_key": {"inline_string": key_pem},
                },
            }
        ]
    }


def write_secret(proxy_dir: Path, *, chain_pem: str, key_pem: str) -> Path:
    """Replace ``smc-sds/default.json`` (0640: the agent's and Envoy's group) atomically;
    returns its path."""
    path = prepare_sds_dir(proxy_dir) / SECRET_FILE
    doc = secret_document(chain_pem=chain_pem, key_pem=key_pem)
    write_private(path, json.dumps(doc).encode("ascii"), mode=0o640)
    return path


def read_secret(proxy_dir: Path) -> tuple[str, str] | None:
    """``(chain_pem, key_pem)`` of ``smc-sds/default.json``; None when absent or unreadable."""
    try:
        doc = json.loads((sds_dir(proxy_dir) / SECRET_FILE).read_bytes())
        tls = doc["resources"][0]["tls_certificate"]
        chain = tls["certificate_chain"]["inline_string"]
        key = tls["private_key"]["inline_string"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(chain, str) or not isinstance(key, str):
        return None
    return chain, key


def read_status(proxy_dir: Path) -> dict[str, Any] | None:
    """The last ``SignResponse`` (public fields) the agent kept; None when absent/unreadable."""
    try:
        data = json.loads((sds_dir(proxy_dir) / STATUS_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_pem_files(
    folder: Path, chain_pem: str, key_pem: str, trust_bundle: tuple[str, ...]
) -> None:
    """cert.pem, key.pem (0600) and ca.pem in ``folder`` (gRPC's file_watcher provider), each
    replaced atomically; the key first, so a reader never pairs a new certificate with an old
    key for long."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    roots = "".join(r if r.endswith("\n") else r + "\n" for r in trust_bundle)
    for name, text, mode in (
        ("key.pem", key_pem, 0o600),
        ("cert.pem", chain_pem, 0o644),
        ("ca.pem", roots, 0o644),
    ):
        tmp = folder / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, folder / name)
