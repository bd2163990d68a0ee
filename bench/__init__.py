"""Benchmarks of the scheduler (bench/README.md); run by hand, never by pytest.

See ``bench/README.md`` for how to run each script and the latest figures.
"""
