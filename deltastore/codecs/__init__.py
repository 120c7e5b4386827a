"""Encodings of a tensor's delta, and which encoding each tensor gets."""
