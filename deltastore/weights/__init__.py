"""Model weights on disk and in memory, and the files an in-place apply writes into."""
