"""Measuring versions and ways of storing them: compare, analyze, similarity, plots, measured commits."""
