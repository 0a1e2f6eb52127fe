"""Harnesses that install and start the real parts (Kafka, Envoy, OpenBao) on 127.0.0.1.

Role: used by the test suite and by benchmarks; never by the control plane itself.
Concurrency: each harness owns one child process; start/stop from one thread.
"""
