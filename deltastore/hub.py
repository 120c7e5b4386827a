"""The old path of deltastore.sharing.hub, kept for one release (CHANGELOG.md)."""
import sys

from .sharing import hub

sys.modules[__name__] = hub
