"""A base's weights weighed: each tensor's id and squared norm. A mapped file's tensors are
hashed and their norms taken from its bytes in numpy, two tensors at a time (blake3 and numpy
release the GIL), with no torch (its import was half of a `base add`); tensors from memory (a
module, a state dict) in torch; tensors of files this store trusts (trust.py) not at all."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

from ..core.hashing import raw_tensor_id
from ..core.pools import WORKERS, pipelined
from ..metrics.rawnorms import raw_sq_norm

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
        info = source.infos[name]
        try:
            data = source.view(name)
            return raw_tensor_id(info.dtype, info.shape, data), raw_sq_norm(info.dtype, data)
        finally:
            source.release(name)
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
