"""A base's weights weighed: each tensor's id and squared norm. A mapped file's tensors are
hashed and their norms taken from its bytes in numpy, a block at a time, two tensors at a time (blake3 and numpy
release the GIL), with no torch (its import was half of a `base add`); tensors from memory (a
module, a state dict) in torch; tensors of files this store trusts (trust.py) not at all."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

from ..core.hashing import hasher, hexdigest_id, id_header
from ..core.pools import WORKERS, pipelined
from ..metrics.rawnorms import SqNorm

if TYPE_CHECKING:
    from ..weights.models import TensorSource

Weight = tuple[str, "float | None"]  # a tensor's id and squared norm


def weigh(source: TensorSource, known: Mapping[str, Weight], progress: Callable[[int, int], None] | None
          ) -> dict[str, Weight]:
    """Every tensor's id and squared norm, by name: those in `known` taken from it, the others
    read (the caller then calls `check_unchanged`)."""
    # Tensors from memory one at a time, as before: torch's own threads share out each one.
    work, workers = (_from_bytes(source), WORKERS) if source.mapped else (_from_tensors(source), 1)
    todo = [name for name in source.names if name not in known]
    weights = {name: known[name] for name in source.names if name in known}
    total = len(source.names)
    if progress and weights:
        progress(len(weights), total)
    # Results are small: every name is handed out, so that no core idles behind an embedding.
    for name, weight in pipelined(todo, work, workers, max(1, len(todo))):
        weights[name] = weight
        if progress:
            progress(len(weights), total)
    return weights


def _from_bytes(source: TensorSource) -> Callable[[str], Weight]:
    def weight(name: str) -> Weight:
        # A block at a time, each hashed and weighed while in the cache, then its pages let go:
        # memory does not grow with the largest tensor (an embedding).
        info = source.infos[name]
        h, norm = hasher(info.nbytes), SqNorm(info.dtype)
        h.update(id_header(info.dtype, info.shape))
        try:
            for block in source.blocks(name):
                h.update(block)
                norm.add(block)
        finally:
            source.release(name)
        return hexdigest_id(h), norm.value()
    return weight


def _from_tensors(source: TensorSource) -> Callable[[str], Weight]:
    from ..core.hashing import tensor_id
    from ..metrics.norms import sq_norm

    def weight(name: str) -> Weight:
        t = source.get(name)
        try:
            return tensor_id(t), sq_norm(t)
        finally:
            source.release(name)
    return weight
