"""The repository on disk: objects, the ref log, journals, the catalog and its index, records."""
