"""Helpers the benchmarks share: the weightless Llama model folder, the tear-down of in-process engines."""
