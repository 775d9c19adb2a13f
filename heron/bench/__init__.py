"""Benchmarks run by ``heron bench``."""
