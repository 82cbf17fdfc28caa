"""Corral benchmarks: each module runs with `python -m benchmarks.<name>` and prints one JSON."""
