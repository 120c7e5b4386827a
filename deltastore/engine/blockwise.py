"""A large tensor of a commit, mapped from the base's and the fine-tune's files, read a block of
each at a time by every pass over it (hash, norms, encode, the lossy result's check), each
block's pages let go once read: a commit's memory then does not grow with the model's largest
tensor (a 7B model's embedding is 1 GB in bf16, and a pass over a mapped tensor would otherwise
keep all of its pages). Every figure is the one a whole read gives: ids hash the same bytes,
norms sum the same chunks in the same order (blocks hold whole CHUNKs), and an int8 or int4
result is decoded in numpy as apply decodes it, to torch's bytes (absmax.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..codecs import absmax
from ..codecs.encodings import Encoded
from ..core.hashing import DTYPE_SIZES, DTYPES, hasher, hexdigest_id, id_header
from ..metrics.norms import sq_diff_blocks
from ..weights import models
from ..weights.models import TensorInfo, TensorSource

# A tensor of at least this many bytes is read a block at a time; a smaller one whole.
BLOCKWISE_FROM = 32 << 20


@dataclass(frozen=True)
class Blockwise:
    """Tensor `name` of two mapped sources of one dtype and shape, a block of each at a time."""

    base: TensorSource
    target: TensorSource
    name: str
    info: TensorInfo

    @classmethod
    def of(cls, base: TensorSource, target: TensorSource, name: str) -> "Blockwise | None":
        """None unless the tensor is large, mapped in both (and aligned for its dtype), and of
        one dtype and shape in both: it is then read whole."""
        b, t = base.infos.get(name), target.infos.get(name)
        if b is None or t is None or b.nbytes < BLOCKWISE_FROM or (b.dtype, b.shape) != (t.dtype, t.shape) \
                or DTYPE_SIZES.get(t.dtype, 1) < 2:
            return None
        if not all(src.mapped.get(i.file) and i.start % DTYPE_SIZES[i.dtype] == 0
                   for src, i in ((base, b), (target, t))):
            return None
        return cls(base, target, name, t)

    def pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(base, target) blocks as flat tensors, in order (encodings.Blocks)."""
        dtype = DTYPES[self.info.dtype]
        for base, target in zip(self.base.blocks(self.name), self.target.blocks(self.name)):
            yield torch.frombuffer(base, dtype=dtype), torch.frombuffer(target, dtype=dtype)

    def done(self, start: int, end: int) -> None:
        """Elements `start`..`end` of both were read for this pass: their pages let go."""
        itemsize = DTYPE_SIZES[self.info.dtype]
        self.base.release(self.name, start * itemsize, end * itemsize)
        self.target.release(self.name, start * itemsize, end * itemsize)

    def absmax_result(self, encoding: str, encoded: Encoded) -> tuple[str, float] | None:
        """(result id, ||result - target||^2) of an int8 or int4 entry, as a commit computes them
        from the whole decoded result; None where the encoding or the dtype is not decoded in
        numpy, or a block would not hold whole groups (the caller decodes it whole)."""
        info, bits = self.info, absmax.BITS.get(encoding)
        if bits is None or info.dtype not in absmax.DTYPES:
            return None
        itemsize, numel = DTYPE_SIZES[info.dtype], info.nbytes // DTYPE_SIZES[info.dtype]
        step = models.MAPPED_BLOCK // itemsize
        if step % math.lcm(absmax.int_param(encoded.params, "group_size", 1), 2):
            return None
        h = hasher(info.nbytes)
        h.update(id_header(info.dtype, info.shape))
        out = np.empty(min(models.MAPPED_BLOCK, info.nbytes), dtype=np.uint8)
        dtype = DTYPES[info.dtype]

        def decoded() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for k, (base, target) in enumerate(zip(self.base.blocks(self.name), self.target.blocks(self.name))):
                first, result = k * step, out[:len(target)]
                parts = absmax.block_parts(encoded.parts, encoded.params, bits=bits, numel=numel,
                                           first=first, end=first + len(target) // itemsize)
                absmax.decode_into(parts, encoded.params, bits=bits, base=np.frombuffer(base, dtype=np.uint8),
                                   base_dtype=info.dtype, out=result, dtype=info.dtype)
                h.update(result)
                yield torch.from_numpy(result).view(dtype), torch.frombuffer(target, dtype=dtype)

        err2 = sq_diff_blocks(decoded())
        return hexdigest_id(h), err2
