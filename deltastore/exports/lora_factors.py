"""A delta as a LoRA pair and back: the rank a pair gets, its factors from the delta's SVD, and
the delta a pair stands for, as PEFT forms it for each kind of module.

For a Linear weight (out x in) PEFT adds ``B @ A`` (A: r x in, B: out x r); for an Embedding
(num x dim) and a GPT-2 Conv1D (in x out, ``fan_in_fan_out``) it adds ``(B @ A)^T``. The factors
are those of the best rank-r approximation: the exact truncated SVD, or a randomized one whose
share of the delta's energy is measured, not estimated.
"""

from __future__ import annotations

import torch

from ..codecs.quantize import randomized_svd, truncated_svd
from ..metrics.analysis import energy_fraction, rank_for, singular_values
from .lora_plan import LINEAR, LoraError

__all__ = ["MAX_RANK", "check_rank_options", "chosen_rank", "factors", "factors_randomized", "fit_pair", "product"]

# The largest rank a pair may have, written or read (checked before any allocation).
MAX_RANK = 1 << 16


def check_rank_options(rank: int | None, energy: float | None) -> None:
    """An export's --rank / --energy, as every adapter format takes them."""
    if rank is None and energy is None:
        raise LoraError("give a rank (--rank R) or an energy fraction (--energy F)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= MAX_RANK):
        raise LoraError(f"the rank must be a whole number from 1 to {MAX_RANK}, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise LoraError(f"--energy must be a fraction above 0 and at most 1, got {energy!r}")


def factors(delta: torch.Tensor, rank: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of an adapter pair whose product (as PEFT forms it for ``kind``) is the best
    rank-``rank`` approximation of ``delta``, in float32."""
    us, vh = truncated_svd(delta.to(torch.float32), rank)  # delta ~ us @ vh
    if kind == LINEAR:
        return vh, us  # A: r x in, B: out x r
    # Embedding (num x dim) and Conv1D (in x out): PEFT forms (B @ A)^T.
    return us.T.contiguous(), vh.T.contiguous()


def factors_randomized(delta: torch.Tensor, rank: int, kind: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """As ``factors``, by a randomized SVD (``quantize.randomized_svd``): (A, B, the share of
    the delta's energy the pair holds, measured)."""
    us, vh, held = randomized_svd(delta.to(torch.float32), rank)
    if kind == LINEAR:
        return vh, us, held
    return us.T.contiguous(), vh.T.contiguous(), held


def product(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """The delta (before scaling) that an adapter pair stands for, in float32."""
    out = b.to(torch.float32) @ a.to(torch.float32)
    return out if kind == LINEAR else out.T.contiguous()


def chosen_rank(shape: tuple[int, ...], rank: int | None, energy: float | None,
                spectrum: torch.Tensor | None) -> int:
    """The rank of the pair of a delta of ``shape``: ``rank``, at most the matrix's smaller side
    (that side where ``rank`` is None), lowered with ``energy`` F to the smallest rank whose
    approximation holds F of the energy of ``spectrum`` (the delta's singular values)."""
    r = min(shape) if rank is None else min(rank, min(shape))
    if energy is not None:
        r = min(r, max(1, rank_for(spectrum, energy)))
    return r


def fit_pair(delta: torch.Tensor, kind: str, shape: tuple[int, ...], rank: int | None, energy: float | None,
             exact: bool) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(A, B, rank, share of the delta's energy the pair holds) of the pair of float32 ``delta``
    (of a weight of ``shape``), of ``chosen_rank``: by the exact truncated SVD where ``exact``
    (which ``energy`` needs: the whole spectrum), else by a randomized one."""
    if not exact:
        r = chosen_rank(shape, rank, None, None)
        a, b, held = factors_randomized(delta, r, kind)
        return a, b, r, held
    spectrum = singular_values(delta)
    r = chosen_rank(shape, rank, energy, spectrum)
    a, b = factors(delta, r, kind)
    return a, b, r, energy_fraction(spectrum, r)
