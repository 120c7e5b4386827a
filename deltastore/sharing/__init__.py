"""Sharing a store: the Hugging Face Hub and remotes through fsspec."""
