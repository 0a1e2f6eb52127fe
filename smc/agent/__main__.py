"""``python -m smc.agent``: the resident SMC agent beside one Envoy (see :mod:`smc.agent`).

Role: one small process that stays up for the proxy's life, importing only the standard
library (``ssl``, ``http.client``, ``ctypes``: about 20 MB resident, where ``grpcio`` and
``cryptography`` would cost ~50 MB). It parses the command line, checks the options, and runs
one certificate step (:func:`smc.agent._step.step`) at start and then each time the
certificate in ``<proxy dir>/smc-sds`` is due (its ``renew_after``, read from the public
``certificate.json`` there): the step makes the key (OpenSSL, through Python's ``ssl``
links), gets the CSR signed over HTTPS, writes the file Envoy reads, and drops the key from
memory. A failed step is retried with exponential backoff (0.5 s doubling to 30 s); the
agent remembers, for the next step, which one-time join token was spent (its SHA-256: a new
token written to the file is used when the certificate is no proof any more) and whether the
control plane refused the current certificate as proof. It prints one line per certificate;
``--ready-file`` (0644, no secret: serial, validity, how long the first certificate took, the
process's peak memory) is written at each one. Exit status 1 with a one-line error on bad
options; SIGINT/SIGTERM stop it (a running step finishes first, at most its 10 s timeout).
Concurrency: one thread; steps run one at a time; signals wake the wait via a pipe.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import select
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smc.agent._errors import AgentError
from smc.agent._files import prepare_sds_dir, read_status

__all__ = ["Supervisor", "main", "parser"]

log = logging.getLogger("smc.agent")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smc agent",
        description="Run beside an Envoy: make its key here, get it certified by the control "
        "plane, write it where Envoy reads it (file-based SDS in --proxy-dir), renew it.",
    )
    p.add_argument("--node-id", required=True, help="The Envoy's node id (<ns>/<pod>, vm/...).")
    p.add_argument("--ca-address", required=True, help="HOST:PORT of the certificate service.")
    p.add_argument("--ca-bundle", required=True, help="PEM file of the CA that signed the service.")
    p.add_argument("--server-name", default=None, help="TLS name to check on the service.")
    p.add_argument(
        "--proxy-dir",
        required=True,
        help="Envoy's working directory: the certificate and key go to smc-sds/default.json "
        "there (0640, directory 0750: the agent's user and group), which the proxy's bootstrap and listeners read.",
    )
    proof = p.add_mutually_exclusive_group(required=True)
    proof.add_argument("--token-file", help="Projected service-account token (pods).")
    proof.add_argument("--join-token-file", help="One-time join token (VMs).")
    p.add_argument("--ready-file", default=None, help="Written at each certificate (public).")
    p.add_argument(
        "--cert-dir",
        default=None,
        help="Also write cert.pem, key.pem (0600) and ca.pem here, renewed in place "
        "(for a proxyless gRPC workload's file_watcher certificate provider).",
    )
    p.add_argument("--retry-initial", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="INFO")
    return p


def _ca_pem(option: str) -> str:
    if option.startswith("env:"):
        pem = os.environ.get(option[4:], "")
    else:
        try:
            pem = Path(option).read_text("ascii")
        except (OSError, ValueError) as exc:
            raise AgentError(f"--ca-bundle {option}: {exc}") from exc
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise AgentError(f"--ca-bundle {option}: no PEM certificate there")
    return pem


def _peak_rss_kb() -> int:
    """VmHWM of this process (reset at exec, unlike ``ru_maxrss``, which keeps the peak of
    the process it was forked from); ``ru_maxrss`` where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


class Supervisor:
    """Runs certificate steps when due (see the module docstring)."""

    def __init__(
        self,
        spec: dict[str, Any],
        *,
        ready_file: Path | None = None,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
    ) -> None:
        self.spec = dict(spec)
        self.proxy_dir = Path(spec["proxy_dir"])
        self.ready_file = ready_file
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.started_at = time.monotonic()
        self.first_seconds: float | None = None
        self.certificates = 0
        self.failures = 0
        self.steps = 0
        self.join_used = ""  # SHA-256 of the spent join token
        self.cert_refused = False
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # ------------------------------------------------------------------ waiting
    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` or until a signal arrives."""
        if seconds <= 0 or self.stopping:
            return
        select.select([self._wake_r], [], [], seconds)
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def due_in(self) -> float:
        """Seconds until the held certificate is due (0: now, no usable status)."""
        status = read_status(self.proxy_dir)
        if status is None:
            return 0.0
        try:
            due = datetime.fromisoformat(str(status["renew_after"]))
        except (KeyError, ValueError):
            return 0.0
        return max(0.0, (due - datetime.now(UTC)).total_seconds())

    # ------------------------------------------------------------------ one step
    def step(self) -> dict[str, Any]:
        """Run one certificate step here; its outcome (``ok`` False with ``error`` if failed)."""
        from smc.agent._step import step

        self.steps += 1
        spec = dict(self.spec, join_used=self.join_used, cert_refused=self.cert_refused)
        result = step(spec)
        self.join_used = str(result.get("join_used") or self.join_used)
        if result.get("ok"):
            self.cert_refused = False
        else:
            self.cert_refused = bool(result.get("cert_refused", self.cert_refused))
        return result

    def _announce(self, result: dict[str, Any]) -> None:
        self.certificates += 1
        if self.first_seconds is None:
            self.first_seconds = time.monotonic() - self.started_at
            print(
                f"agent: serving certificate {result['serial']} "
                f"(first in {self.first_seconds:.3f}s)",
                flush=True,
            )
        else:
            print(
                f"agent: renewed, serving certificate {result['serial']} until "
                f"{result['not_after']}",
                flush=True,
            )
        if self.ready_file is not None:
            tmp = self.ready_file.with_name(self.ready_file.name + ".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "serial": result["serial"],
                        "not_after": result["not_after"],
                        "renew_after": result["renew_after"],
                        "first_certificate_seconds": self.first_seconds,
                        "certificates": self.certificates,
                        "steps": self.steps,
                        "failures": self.failures,
                        # this process's peak resident memory so far (kB)
                        "peak_rss_kb": _peak_rss_kb(),
                    }
                )
            )
            tmp.replace(self.ready_file)

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        old_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        backoff = self.retry_initial
        serving: str | None = None
        try:
            while not self.stopping:
                if serving is not None:
                    wait = self.due_in()
                    if wait > 0:
                        self._sleep(wait)
                        continue
                result = self.step()
                if result.get("ok"):
                    backoff = self.retry_initial
                    if result.get("serial") != serving:
                        serving = str(result["serial"])
                        self._announce(result)
                    continue
                self.failures += 1
                log.warning(
                    "certificate request failed (retry in %.1fs): %s", backoff, result.get("error")
                )
                self._sleep(backoff)
                backoff = min(self.retry_max, backoff * 2)
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        proxy_dir = Path(args.proxy_dir).absolute()
        spec = {
            "proxy": args.node_id,
            "ca_address": args.ca_address,
            "ca_bundle_pem": _ca_pem(args.ca_bundle),
            "server_name": args.server_name,
            "proxy_dir": str(proxy_dir),
            "token_file": str(Path(args.token_file).absolute()) if args.token_file else None,
            "join_token_file": (
                str(Path(args.join_token_file).absolute()) if args.join_token_file else None
            ),
            "cert_dir": str(Path(args.cert_dir).absolute()) if args.cert_dir else None,
            "log_level": args.log_level,
        }
        prepare_sds_dir(proxy_dir)
    except (OSError, AgentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    supervisor = Supervisor(
        spec,
        ready_file=Path(args.ready_file) if args.ready_file else None,
        retry_initial=args.retry_initial,
    )
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
