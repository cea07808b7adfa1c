"""Benchmarks shipped with the package (`frontierlm bench ...`)."""
