"""Density profiles: per-layer, per-head budgets measured on real models, fitted for long contexts."""
