"""deltastore: store, version, apply and share fine-tuning deltas of PyTorch language models."""

from .core.errors import (AmbiguousRef, BaseMismatch, BaseNotFound, CorruptObject, DeltastoreError,
                     EncodingError, JournalError, MissingObject, ModelFormatError, PatchBusy, PickleRefused,
                     RefNotFound, SelectionError, SharedFile, StoreNotFound, UnsafeInput)
from .repo.records import Base, CommitResult, ModelWritten, TagChange, TensorEntry, Version, VersionInfo
from .store import Store

__version__ = "0.1.0"


def __getattr__(name: str):
    # `deltastore.load` imports the Hub client and transformers: only when first used, so that
    # importing deltastore (and every command) stays fast.
    if name == "load":
        from .sharing.hubload import load
        return load
    raise AttributeError(f"module 'deltastore' has no attribute {name!r}")


__all__ = [
    "Store", "load", "Base", "Version", "VersionInfo", "TensorEntry", "CommitResult", "TagChange", "ModelWritten", "DeltastoreError", "AmbiguousRef",
    "BaseMismatch", "BaseNotFound", "CorruptObject", "EncodingError", "JournalError",
    "MissingObject", "ModelFormatError", "PatchBusy", "PickleRefused", "RefNotFound", "SelectionError",
    "SharedFile", "StoreNotFound", "UnsafeInput",
]
