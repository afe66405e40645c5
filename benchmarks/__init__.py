"""Benchmarks and the demo, run as modules from the repository root (``python -m benchmarks.demo``)."""
