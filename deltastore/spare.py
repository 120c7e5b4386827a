"""The old path of deltastore.core.spare, kept for one release (CHANGELOG.md)."""
import sys

from .core import spare

sys.modules[__name__] = spare
