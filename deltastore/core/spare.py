"""Spare buffers: memory an apply or a revert has finished with, kept for the next apply of
the same sizes.

An apply decompresses each object into a buffer, and writes each tensor it decodes into
another (or keeps the base bytes it replaces there); revert hands the module the base bytes
back. Fresh memory is the slow part of that: the kernel maps and zeroes every page on its
first write (measured on 2 cores: a 988 MB copy into fresh memory took 640-730 ms, into memory
already written 90-125 ms). So an apply gives back each object's buffer once it is decoded, a
revert gives back its buffers, and the next apply takes them: switching one model back and
forth between whole-model stances then touches no fresh page.

At most `limit()` bytes are kept (default 2 GiB, per process); `release()` frees them all.
Owns only the buffers it holds: a buffer taken is the taker's, one given is never used again
by the giver.
"""

from __future__ import annotations

import threading

import torch

_LIMIT = 2 << 30
_HELD: dict[int, list[torch.Tensor]] = {}  # size in bytes -> buffers of that size
_LOCK = threading.Lock()


def take(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU tensor of `shape` and `dtype` (contents undefined): a spare buffer of
    its size where there is one, else a new one."""
    count = 1
    for d in shape:
        count *= int(d)
    size = count * torch.empty(0, dtype=dtype).element_size()
    with _LOCK:
        found = _HELD.get(size)
        buffer = found.pop() if found else None
    if buffer is None:
        return torch.empty(shape, dtype=dtype)
    return buffer.view(dtype).reshape(shape)


def give(t: torch.Tensor) -> None:
    """Keep a contiguous CPU tensor that its owner no longer uses, if the limit allows."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0 or t.storage_offset() \
            or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return  # only a whole buffer of its own, never a view into something else
    flat = t.detach().reshape(-1).view(torch.uint8)
    with _LOCK:
        if held_bytes() + flat.numel() <= _LIMIT:
            _HELD.setdefault(flat.numel(), []).append(flat)


def held_bytes() -> int:
    return sum(size * len(buffers) for size, buffers in _HELD.items())


def limit(nbytes: int | None = None) -> int:
    """The most bytes kept (set it with `nbytes`; 0 keeps none); returns the limit in force."""
    global _LIMIT
    if nbytes is not None:
        with _LOCK:
            _LIMIT = max(0, int(nbytes))
            while held_bytes() > _LIMIT:
                largest = max(_HELD)
                _HELD[largest].pop()
                if not _HELD[largest]:
                    del _HELD[largest]
    return _LIMIT


def release() -> None:
    """Free every spare buffer."""
    with _LOCK:
        _HELD.clear()


__all__ = ["take", "give", "held_bytes", "limit", "release"]
