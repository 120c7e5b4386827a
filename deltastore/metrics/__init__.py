"""Measures of a fine-tune: delta statistics, fidelity, alpha."""
