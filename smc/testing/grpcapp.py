"""A proxyless gRPC workload for tests: a grpcio xDS server, or a grpcio xDS client.

Role: ``python -m smc.testing.grpcapp serve --name N --address IP --port P`` runs a gRPC
server created with ``xds=True`` and xDS server credentials (its listener, mTLS and RBAC come
from the control plane through ``$GRPC_XDS_BOOTSTRAP``); it serves ``/demo.Greeter/SayHello``
and ``/demo.Greeter/SayGoodbye`` and answers with JSON naming itself, the method and the
caller's certificate (URI SAN and serial) as gRPC's auth context shows it.
``python -m smc.testing.grpcapp call --target xds:///greeter.demo --method M [--count N]
[--wait-for CODE --within S]`` makes the calls over an ``xds:///`` channel with xDS channel
credentials and prints one JSON line per call (status code name, details, reply, seconds).
No generated code: the messages are raw bytes. Each process is one xDS node (the bootstrap
names it), as in a real deployment.
Concurrency: one process per workload; the server uses a small thread pool.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent import futures
from typing import Any

import grpc
import grpc.experimental
from cryptography import x509

SERVICE = "demo.Greeter"
METHODS = ("SayHello", "SayGoodbye")


def _peer(context: grpc.ServicerContext) -> dict[str, Any]:
    auth = context.auth_context()
    out: dict[str, Any] = {
        "san": [v.decode() for v in auth.get("x509_subject_alternative_name", [])]
    }
    pems = auth.get("x509_pem_cert") or []
    if pems:
        out["serial"] = format(x509.load_pem_x509_certificate(pems[0]).serial_number, "x")
    return out


def serve(name: str, address: str, port: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), xds=True)

    def handler(method: str) -> grpc.RpcMethodHandler:
        def reply(request: bytes, context: grpc.ServicerContext) -> bytes:
            body = {"server": name, "method": method, "peer": _peer(context)}
            return json.dumps(body).encode()

        return grpc.unary_unary_rpc_method_handler(reply)

    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {m: handler(m) for m in METHODS}),)
    )
    creds = grpc.xds_server_credentials(grpc.insecure_server_credentials())
    bound = server.add_secure_port(f"{address}:{port}", creds)
    if bound == 0:
        raise SystemExit(f"cannot bind {address}:{port}")
    server.start()
    print(json.dumps({"serving": f"{address}:{port}"}), flush=True)
    server.wait_for_termination()


def _one(stub: Any, metadata: list[tuple[str, str]], timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        reply = stub(b"hello", timeout=timeout, metadata=metadata)
        return {
            "code": "OK",
            "reply": json.loads(reply),
            "seconds": round(time.monotonic() - t0, 3),
        }
    except grpc.RpcError as err:
        return {
            "code": err.code().name,
            "details": err.details(),
            "seconds": round(time.monotonic() - t0, 3),
        }


def call(
    target: str,
    method: str,
    count: int,
    metadata: list[tuple[str, str]],
    wait_for: str | None,
    within: float,
    timeout: float,
) -> None:
    creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
    with grpc.secure_channel(target, creds) as channel:
        stub = channel.unary_unary(f"/{SERVICE}/{method}")
        if wait_for is not None:
            deadline = time.monotonic() + within
            while True:
                got = _one(stub, metadata, timeout)
                if got["code"] == wait_for:
                    break
                if time.monotonic() > deadline:
                    print(json.dumps({"waited": False, "last": got}), flush=True)
                    raise SystemExit(3)
                time.sleep(0.2)
        for _ in range(count):
            print(json.dumps(_one(stub, metadata, timeout)), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m smc.testing.grpcapp")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--address", required=True)
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("call")
    c.add_argument("--target", required=True)
    c.add_argument("--method", choices=METHODS, default="SayHello")
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--metadata", action="append", default=[], help="key=value")
    c.add_argument("--wait-for", help="retry one call until it ends with this status code")
    c.add_argument("--within", type=float, default=30.0)
    c.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        serve(args.name, args.address, args.port)
    else:
        md = [tuple(kv.split("=", 1)) for kv in args.metadata]
        call(args.target, args.method, args.count, md, args.wait_for, args.within, args.timeout)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
