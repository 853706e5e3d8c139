"""Benchmarks of the connector: routed-message throughput, latency and CPU (bench/README.md)."""
