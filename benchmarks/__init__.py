"""Benchmark scripts. A package only so that setup.py can install loadtest.py as
`proxyattn_benchmarks.loadtest` (the `proxyattn-loadtest` command); run the scripts directly."""
