"""The `deltastore` command line: a thin click layer over the library."""

from .main import cli

__all__ = ["cli"]
