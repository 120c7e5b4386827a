"""deltastore: store, version, apply and share fine-tuning deltas of PyTorch language models."""

from .errors import (AmbiguousRef, BaseMismatch, BaseNotFound, CorruptObject, DeltastoreError,
                     EncodingError, JournalError, MissingObject, ModelFormatError, PatchBusy, PickleRefused,
                     RefNotFound, SelectionError, SharedFile, StoreNotFound, UnsafeInput)
from .records import Base, CommitResult, TensorEntry, Version, VersionInfo
from .store import Store

__version__ = "0.1.0"

__all__ = [
    "Store", "Base", "Version", "VersionInfo", "TensorEntry", "CommitResult", "DeltastoreError", "AmbiguousRef",
    "BaseMismatch", "BaseNotFound", "CorruptObject", "EncodingError", "JournalError",
    "MissingObject", "ModelFormatError", "PatchBusy", "PickleRefused", "RefNotFound", "SelectionError",
    "SharedFile", "StoreNotFound", "UnsafeInput",
]
