"""Benchmark datasets: real-data loaders and deterministic, lazily generated stand-ins."""
