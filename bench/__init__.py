"""Benchmarks against peer tools: one side-by-side table per run (not tests)."""
