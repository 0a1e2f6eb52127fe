"""One request with 20,000 documents through the real HTTP API (real SQLite log, real runner):
answered 200 with every document created and readable right after (not a 504 while the work
goes on), and the YAML loader's fast path for small documents keeps every limit."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from smc.smi import load_documents
from smc.testing.serve import ServeProcess


def _doc(i: int) -> dict[str, object]:
    return {
        "apiVersion": "smc.dev/v1alpha1",
        "kind": "MeshService",
        "metadata": {"name": f"s{i}", "namespace": "big"},
        "spec": {
            "ports": [{"name": "http", "port": 80, "protocol": "http"}],
            "selector": {"app": f"s{i}"},
        },
    }


@pytest.mark.timeout(240)
def test_twenty_thousand_documents_in_one_request(tmp_path: Path) -> None:
    serve = ServeProcess(tmp_path, xds_host=None)
    try:
        serve.wait_ready()
        body = json.dumps(
            {"documents": [_doc(i) for i in range(20_000)]}, separators=(",", ":")
        ).encode()
        assert len(body) < 4 * 1024 * 1024  # under the API body cap
        started = time.monotonic()
        status, answer = serve.request("/v1/apply", method="POST", body=body, timeout=200)
        took = time.monotonic() - started
        assert status == 200, (status, str(answer)[:500])
        assert [r["status"] for r in answer["results"]] == ["created"] * 20_000
        status, listed = serve.request("/v1/services", timeout=60)
        assert status == 200 and len(listed["items"]) == 20_000
        print(f"20,000 documents applied in {took:.1f} s")
    finally:
        assert serve.stop() == 0, serve.tail()


def test_small_document_fast_path_keeps_the_limits() -> None:
    deep = "a: " + "[" * 150 + "]" * 150 + "\n"
    assert "nested deeper than 100" in str(load_documents(deep, source="t").errors)
    dashes = "a:\n" + "".join(" " * i + "- \n" for i in range(120))
    assert load_documents(dashes, source="t").errors
    dup = "apiVersion: v1\nkind: MeshService\nkind: TrafficTarget\n"
    assert "duplicate key 'kind'" in str(load_documents(dup, source="t").errors)
    bomb = (
        'a: &a ["x","x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
    )
    bomb += "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    bomb += "e: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    assert "more than" in str(load_documents(bomb, source="t").errors)
