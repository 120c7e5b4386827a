"""A large tensor of a commit, mapped from the base's and the fine-tune's files, read a block of
each at a time by every pass over it (hash, norms, encode, the lossy result's check), each
block's pages let go once read: a commit's memory then does not grow with the model's largest
tensor (a 7B model's embedding is 1 GB in bf16, and a pass over a mapped tensor would otherwise
keep all of its pages). Every figure is the one a whole read gives: ids hash the same bytes,
norms sum the same chunks in the same order (blocks hold whole CHUNKs), and an int8 or int4
result is decoded in numpy, a slice at a time, as apply decodes it, to torch's bytes
(encodings.Reading, absmax.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ..core.hashing import DTYPE_SIZES, DTYPES, hasher, hexdigest_id, id_header
from ..metrics.norms import sq_diff_terms
from ..metrics.rawnorms import CHUNK
from ..weights.models import TensorInfo, TensorSource

# A tensor of at least this many bytes is read a block at a time; a smaller one whole (at 32 MB,
# the whole reads of two workers, 27 MB MLP matrices of a 1.5B model, and their encoders'
# temporaries held an int4 commit at 0.81-0.88 GB; at 4 MB, 0.45 GB, in the same time).
BLOCKWISE_FROM = 4 << 20


@dataclass
class Blockwise:
    """Tensor `name` of two mapped sources of one dtype and shape, a block of each at a time
    (encodings.Reading)."""

    base: TensorSource
    target: TensorSource
    name: str
    info: TensorInfo
    _sums: list = field(default_factory=list)  # a lossy result's hasher, then its error's terms

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
        """(base, target) blocks as flat tensors, in order (xorbytes.Blocks: what Encoding.stream reads)."""
        dtype = DTYPES[self.info.dtype]
        for base, target in zip(self.base.blocks(self.name), self.target.blocks(self.name)):
            yield torch.frombuffer(base, dtype=dtype), torch.frombuffer(target, dtype=dtype)

    def done(self, start: int, end: int) -> None:
        """Elements `start`..`end` of both were read for this pass: their pages let go."""
        itemsize = DTYPE_SIZES[self.info.dtype]
        self.base.release(self.name, start * itemsize, end * itemsize)
        self.target.release(self.name, start * itemsize, end * itemsize)

    @property
    def step(self) -> int:
        """Elements of a slice of `result` (encodings.Reading): whole chunks of the norms."""
        return CHUNK

    def result(self, start: int, end: int, data: np.ndarray) -> None:
        """A lossy stream's result, slice after slice from element 0 (each pass starts again):
        hashed, and its squared error against the target summed as `sq_diff` sums it."""
        if start == 0:
            self._sums.clear()
            self._sums.append(hasher(self.info.nbytes))
            self._sums[0].update(id_header(self.info.dtype, self.info.shape))
        itemsize, dtype = DTYPE_SIZES[self.info.dtype], DTYPES[self.info.dtype]
        self._sums[0].update(data)
        target = torch.frombuffer(self.target.view(self.name)[start * itemsize:end * itemsize], dtype=dtype)
        self._sums.extend(sq_diff_terms([(torch.from_numpy(data).view(dtype), target)]))

    def checked(self) -> tuple[str, float]:
        """(result id, ||result - target||^2) of the last whole pass of `result`."""
        return hexdigest_id(self._sums[0]), sum(self._sums[1:])
