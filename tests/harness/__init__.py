"""Test and benchmark support that is no part of the library: the kill harness (``kill``) and the corpus of
malformed image files (``faults``).

Tests import it as ``harness`` (pytest puts tests/ on sys.path, as for conftest and tiny_models); the
benchmarks that use it put tests/ on sys.path, as they do for tiny_models. It imports nothing from the
tests (conftest) or the benchmarks.
"""
