"""What this process knows a live tensor holds: the tensor id it was hashed to, or written
with, for as long as nothing has written to it since.

Apply must know that a module's tensor is the base before it touches it. Hashing a whole model
costs a tenth of a second or more; once a tensor has been hashed (or written by deltastore with
bytes of a known id) that need not be repeated while the tensor is unchanged. Unchanged is
judged cheaply, and conservatively:
- the same tensor object (held by weak reference), at the same data pointer, shape, strides
  and dtype: `param.data = other` or a resize shows;
- the same version counter: every in-place torch operation on the tensor (an optimizer step,
  `load_state_dict`, `copy_` under no_grad) bumps it;
- the same bytes at a few hundred places spread over the tensor: catches writes that bypass
  the counter (through `.data`, or a numpy view) wherever they change more than a few elements.
A write that slips past all three (a single element changed through `.data`) goes unseen:
`forget_all` drops everything, and a caller that edits weights behind torch's back should
call it.

Owns no tensor: never keeps one alive, never reads more than the sampled bytes.
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

# Sampled places per tensor, and bytes read at each.
SAMPLES = 256
SAMPLE_BYTES = 16


@dataclass(frozen=True)
class _Record:
    ref: weakref.ref
    layout: tuple
    version: int
    sample: bytes
    tensor_id: str


_KNOWN: dict[int, _Record] = {}
_LOCK = threading.Lock()


def _layout(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


def _sample(t: torch.Tensor) -> bytes | None:
    """A few hundred short runs of the tensor's bytes, evenly spread; None where the tensor is
    not one contiguous block (nothing is remembered of it then)."""
    if not t.is_contiguous() or t.numel() == 0:
        return None
    flat = t.detach().reshape(-1).view(torch.uint8)
    n = flat.numel()
    if n <= SAMPLES * SAMPLE_BYTES:
        return flat.cpu().numpy().tobytes()
    places = _places(n)
    if flat.device.type == "cpu":
        # numpy's gather: torch's indexing of a large tensor costs 0.5 ms per call here.
        return flat.numpy()[places].tobytes()
    return flat[torch.from_numpy(places).to(flat.device)].cpu().numpy().tobytes()


@functools.lru_cache(maxsize=1024)
def _places(n: int) -> np.ndarray:
    starts = np.linspace(0, n - SAMPLE_BYTES, SAMPLES).astype(np.int64)
    return (starts[:, None] + np.arange(SAMPLE_BYTES)).reshape(-1)


def remember(t: torch.Tensor, tensor_id: str | None) -> None:
    """`t` holds bytes of id `tensor_id` now (None: forget what it held)."""
    sample = _sample(t) if tensor_id is not None else None
    with _LOCK:
        if sample is None:
            _KNOWN.pop(id(t), None)
            return
        key = id(t)
        _KNOWN[key] = _Record(weakref.ref(t, lambda ref: _drop(key, ref)), _layout(t), t._version, sample,
                              tensor_id)


def _drop(key: int, ref: weakref.ref) -> None:
    # The tensor is gone; a newer record under a reused id is not this one's to drop.
    with _LOCK:
        if key in _KNOWN and _KNOWN[key].ref is ref:
            del _KNOWN[key]


def known_id(t: torch.Tensor) -> str | None:
    """The id `t` was last remembered with, if it is unchanged since; None otherwise."""
    with _LOCK:
        record = _KNOWN.get(id(t))
    if record is None or record.ref() is not t or record.layout != _layout(t) or record.version != t._version:
        return None
    return record.tensor_id if _sample(t) == record.sample else None


def forget_all() -> None:
    with _LOCK:
        _KNOWN.clear()


__all__ = ["remember", "known_id", "forget_all"]
