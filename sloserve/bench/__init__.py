"""Benchmark client: workloads, load generation, metrics and plots."""
