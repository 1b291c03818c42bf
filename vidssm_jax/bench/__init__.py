"""Benchmarks: `python -m vidssm_jax.bench.<name>`; each prints a table."""
