"""Benchmarks of the scheduler (SPEC §13, issue 6); run by hand, never by pytest.

See ``bench/README.md`` for how to run each script and the latest figures.
"""
