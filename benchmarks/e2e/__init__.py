"""End-to-end vLLM benchmarks: TTFT sweeps of a server, the load-test client, a profiled prefill."""
