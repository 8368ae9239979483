"""Benchmarks and comparison reports (not built yet)."""
