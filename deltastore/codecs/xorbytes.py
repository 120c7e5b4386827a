"""The byte layout of lossless payloads from torch tensors (bytegroups.py is its numpy side):
a base's and a fine-tune's bit patterns XORed, grouped by byte, whole or a chunk at a time, and
back."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .bytegroups import WORDS as _WORDS, ungroup
from ..core.errors import EncodingError

# (base, target) pieces of two tensors, flat and in order (Encoding.stream).
Blocks = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, flat, as a uint8 tensor (a view where it is contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def bytes_tensor(data: bytes | memoryview) -> torch.Tensor:
    """A uint8 tensor holding a copy of `data` (a payload read from an object)."""
    if not len(data):
        return torch.empty(0, dtype=torch.uint8)
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


# Lossless payloads of at least this many bytes are streamed to the object store: a large
# tensor's XOR is then never held whole (a third copy of an embedding), and each chunk is
# hashed and compressed while it is still in the cache.
STREAM_FROM = 4 << 20

def _group_into(out: np.ndarray, words: np.ndarray, first: int, n: int) -> None:
    """Byte k of each element of `words` into out[k*n + first:], for every k. Shifts `words`."""
    count = words.size
    for k in range(words.itemsize):
        if k:
            np.right_shift(words, 8, out=words)
        # A casting assignment keeps the low byte.
        out[k * n + first:k * n + first + count] = words


def byte_group(raw: torch.Tensor, itemsize: int) -> memoryview:
    """All first bytes of every element, then all second bytes, ...: zstd finds far more
    runs this way, because the high bytes (sign, exponent) of a small delta are mostly equal."""
    src = raw.numpy()
    if itemsize == 1:
        return memoryview(src.copy())
    out = np.empty(src.size, dtype=np.uint8)
    _group_into(out, src.view(_WORDS[itemsize]).copy(), 0, src.size // itemsize)
    return memoryview(out)


def xor_grouped(base: torch.Tensor, target: torch.Tensor, *, chunk: int = 1 << 22) -> memoryview:
    """byte_group(base XOR target), chunk by chunk: never a whole-tensor XOR temporary, which
    for a 150M-element embedding would be a third copy of it in memory. XOR is bitwise, so
    numpy's integer XOR serves every dtype (and runs several times faster than torch's here)."""
    itemsize = target.element_size()
    b, t = as_bytes(base).numpy(), as_bytes(target).numpy()
    if itemsize == 1:
        return memoryview(np.bitwise_xor(b, t))
    b, t = b.view(_WORDS[itemsize]), t.view(_WORDS[itemsize])
    out = np.empty(t.size * itemsize, dtype=np.uint8)
    for start in range(0, t.size, chunk):
        _group_into(out, np.bitwise_xor(b[start:start + chunk], t[start:start + chunk]), start, t.size)
    return memoryview(out)


def xor_planes(base: torch.Tensor, target: torch.Tensor, *, chunk: int = 1 << 18,
               blocks: Blocks | None = None) -> Iterator[memoryview]:
    """xor_grouped's bytes, a chunk at a time: plane by plane, each chunk XORed again from
    base and target (cheap, and in the cache), so that no whole-tensor buffer is held; from
    `blocks()` (Encoding.stream), called once per plane, where given."""
    itemsize = target.element_size()
    for k in range(itemsize):
        for base_block, target_block in (blocks() if blocks is not None else [(base, target)]):
            b, t = as_bytes(base_block).numpy(), as_bytes(target_block).numpy()
            if itemsize > 1:
                b, t = b.view(_WORDS[itemsize]), t.view(_WORDS[itemsize])
            for start in range(0, t.size, chunk):
                x = np.bitwise_xor(b[start:start + chunk], t[start:start + chunk])
                if k:
                    np.right_shift(x, 8 * k, out=x)
                yield memoryview(x if itemsize == 1 else x.astype(np.uint8))


def byte_ungroup(data: bytes | memoryview, itemsize: int, *, xor: np.ndarray | None = None,
                 out: np.ndarray | None = None, chunk: int = 1 << 20) -> torch.Tensor:
    """The inverse of byte_group, as a uint8 tensor (see bytegroups.ungroup)."""
    return torch.from_numpy(ungroup(data, itemsize, xor=xor, out=out, chunk=chunk))


def xor_ungroup_in_place(data: bytes | memoryview, itemsize: int, target: np.ndarray, keep: np.ndarray, *,
                         chunk: int = 1 << 18) -> None:
    """A lossless xor payload decoded straight into `target`, the base's bytes, a chunk of
    elements at a time, each chunk's base bytes copied into `keep` first: one pass over the
    target where decoding into a buffer and then exchanging it with the target took two (an
    embedding of 136M bf16 elements: 35 ms CPU against 49). `target` and `keep` are flat uint8
    arrays of the payload's size. On an error, `target` is put back from `keep` first."""
    src = np.frombuffer(data, dtype=np.uint8) if len(data) else np.empty(0, dtype=np.uint8)
    if not (src.size == target.size == keep.size) or src.size % itemsize or itemsize not in (1, *_WORDS):
        raise EncodingError(f"payload of {src.size} bytes does not fit {target.size} bytes of "
                            f"{itemsize}-byte elements")
    n = src.size // itemsize
    planes = src.reshape(itemsize, n)
    words, kept = (target, keep) if itemsize == 1 else (target.view(_WORDS[itemsize]), keep.view(_WORDS[itemsize]))
    done = 0
    try:
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            w = words[start:end]
            np.copyto(kept[start:end], w)
            done = end
            if itemsize == 1:
                np.bitwise_xor(planes[0, start:end], kept[start:end], out=w)
                continue
            np.copyto(w, planes[-1, start:end])
            for k in range(itemsize - 2, -1, -1):
                w <<= 8
                w |= planes[k, start:end]
            w ^= kept[start:end]
    except BaseException:
        np.copyto(words[:done], kept[:done])
        raise
