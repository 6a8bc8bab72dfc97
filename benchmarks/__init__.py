"""Benchmarks: each script prints one JSON object (run from the repository root with `python -m benchmarks.NAME`)."""
