"""Benchmarks run by ``visattn bench`` and ``benchmarks/*.py``: competitors in one process, on the same inputs."""
