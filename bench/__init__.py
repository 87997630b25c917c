"""Measuring tools: load, engine and offline benchmarks (not imported by the server)."""
