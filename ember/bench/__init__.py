"""Benchmarks (the workloads W1-W5 of BENCHMARKS.md) and the random models they run on."""
