"""The spectral-norm vs baseline comparison: statistics, the report built from the read model, its renderings."""
