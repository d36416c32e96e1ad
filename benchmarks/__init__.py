"""Benchmark scripts, one folder per kind of measurement (see README.md). A package so that the
tests import them as ``benchmarks.<folder>.<module>`` and setup.py installs the load-test client as
``proxyattn_benchmarks.e2e.loadtest`` (the ``proxyattn-loadtest`` command); run the scripts directly."""
