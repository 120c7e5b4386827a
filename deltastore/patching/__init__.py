"""Versions applied: to live modules, and to model files on disk."""
