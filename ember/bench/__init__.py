"""Benchmarks (../shared/bench/WORKLOAD.md) and the random models they run on."""
