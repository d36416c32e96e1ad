"""GPU checks of the backend inside vLLM: equivalence with dense attention, tensor parallelism,
prefix caching, preemption, a soak under load."""
