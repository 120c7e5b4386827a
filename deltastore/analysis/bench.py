"""The bench ``compare`` and ``commit --encoding auto`` measure on: ONE Hugging Face model of the
base, into which each row's reconstructed tensors are copied in place, tensor by tensor, and
measured by a ``FidelityProbe``; the fine-tune is put back only where the next row does not set
the tensor itself. ``open_bench`` also scans the pair once: which tensors changed, how much, and
their deltas' singular values where LoRA ranks are asked for.

Both models are mapped, each tensor let go once used: peak memory is the loaded model plus a few
tensors in flight. It never writes, prints or loads a pickle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..codecs import encodings as codecs
from ..codecs import quantize as Q
from ..core.errors import CompareError
from ..core.pools import in_order
from ..engine.commit import delta_stats
from ..metrics.analysis import singular_values
from ..metrics.fidelity import Fidelity, FidelityProbe, load_causal_lm, read_prompts
from ..patching.apply import match_names, module_tensors
from ..weights.models import TensorSource, open_model

__all__ = ["Bench", "Scan", "Work", "open_bench", "raw_bytes"]


@dataclass(frozen=True)
class Scan:
    changed: bool
    rel_change: float | None
    energy: float
    spectrum: tuple[float, ...] | None  # changed float 2-D tensors, when ranks are asked for


def raw_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes, as they are stored."""
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.numel() == 0 or bool(np.array_equal(np.asarray(raw_bytes(a)), np.asarray(raw_bytes(b))))


# A work function: tensor name -> (bytes, whether it is stored, the tensor the model should
# hold for this row, or None for "the fine-tune's own").
Work = Callable[[str], tuple[int, bool, "torch.Tensor | None"]]


class Bench:
    def __init__(self, base: TensorSource, target: TensorSource, *, model: torch.nn.Module | None,
                 probe: FidelityProbe | None, progress: Callable[[int, int], None] | None, rows: int):
        self.base, self.target = base, target
        self.names = target.names
        self.model, self.probe = model, probe
        self.params: dict[str, torch.Tensor] = {}
        self.dirty: set[str] = set()  # parameters holding another row's tensor, not the fine-tune's
        self._sizing = False  # a row run for its bytes alone
        if model is not None:
            current = module_tensors(model, self.names)
            mapping = match_names(self.names, set(current))
            self.params = {name: current[mapping[name]] for name in self.names}
            wrong = [n for n, p in self.params.items() if tuple(p.shape) != tuple(target.infos[n].shape)]
            if wrong:
                raise CompareError(f"the model loaded from the base folder has other shapes for "
                                   f"{', '.join(wrong[:3])}; is BASE the model MODEL was tuned from?")
        self.progress = progress
        self.prompts = 0
        self.done, self.total = 0, rows * len(self.names)
        #: The most singular vectors a low-rank row needs; each matrix's are found once
        #: (one eigendecomposition) and serve every rank up to this one.
        self.basis_rank = 0
        self._bases: dict[str, Q.GramBasis] = {}

    def encode(self, enc: codecs.Encoding, name: str, b: torch.Tensor, t: torch.Tensor) -> codecs.Encoded:
        """``enc.encode(b, t)``; a low-rank one from this matrix's basis, made at its first use."""
        rank = getattr(enc, "rank", None)
        if not isinstance(enc, codecs.LowRank) or rank is None or rank > self.basis_rank:
            return enc.encode(b, t)
        basis = self._bases.get(name)
        if basis is None:
            dw = t.detach().to("cpu", torch.float32) - b.detach().to("cpu", torch.float32)  # as enc takes it
            if t.dim() != 2 or not Q.all_finite(dw):
                return enc.encode(b, t)  # refused there, in its own words
            basis = self._bases[name] = Q.gram_basis(dw, keep=self.basis_rank)
        return enc.encode(b, t, basis=basis)

    @property
    def measuring(self) -> bool:
        """Whether the row now run needs each tensor's reconstruction (not only its bytes)."""
        return self.probe is not None and not self._sizing

    def _put(self, name: str, value: torch.Tensor) -> None:
        param = self.params[name]
        with torch.no_grad():
            param.copy_(value.to(device=param.device, dtype=param.dtype))

    def load_target(self) -> None:
        for name in self.names:
            self._put(name, self.target.get(name))
        self.dirty.clear()

    def run(self, work: Work, *, measure: bool = True) -> tuple[int, int, Fidelity | None]:
        """(bytes, tensors stored, fidelity) of one row; ``measure=False``: its bytes alone,
        without reconstructing any tensor."""
        total = stored = 0
        self._sizing = not measure
        try:
            for name, (nbytes, is_stored, value) in in_order(self.names, work):
                total += nbytes
                stored += bool(is_stored)
                if self.params:
                    if value is not None:
                        self._put(name, value)
                        self.dirty.add(name)
                    elif name in self.dirty:
                        # The fine-tune's own, where an earlier row left another tensor: put back
                        # here, not after every row (each put is a copy of the whole tensor).
                        self._put(name, self.target.get(name))
                        self.dirty.discard(name)
                self.base.release(name)
                self.target.release(name)
                self.done += 1
                if self.progress:
                    self.progress(min(self.done, self.total), self.total)
        finally:
            self._sizing = False
        # Every tensor was visited (an error stops before measuring): the model holds exactly
        # this row's tensors.
        return total, stored, self.probe.measure() if (measure and self.probe is not None) else None


def _check_pair(base: TensorSource, target: TensorSource) -> None:
    missing, extra = sorted(set(base.names) - set(target.names)), sorted(set(target.names) - set(base.names))
    if missing or extra:
        which = f"lacks {', '.join(missing[:3])}" if missing else f"has {', '.join(extra[:3])} that the base lacks"
        raise CompareError(f"the model {which}; compare needs a fine-tune of the base, tensor for tensor")


def _scan(base: TensorSource, target: TensorSource, *, spectra: bool) -> dict[str, Scan]:
    def work(name: str) -> Scan:
        b, t = base.get(name), target.get(name)
        if _same(b, t):
            return Scan(False, 0.0, 0.0, None)
        rel, energy = delta_stats(b, t)
        spectrum = None
        if spectra and t.dim() == 2 and t.is_floating_point() and b.shape == t.shape:
            spectrum = tuple(singular_values(t.to(torch.float32) - b.to(torch.float32)).tolist())
        return Scan(True, rel, energy, spectrum)

    def released(name: str) -> Scan:
        try:
            return work(name)
        finally:
            base.release(name)
            target.release(name)
    return dict(in_order(target.names, released))


def _prompts(prompts: Sequence[str] | str | os.PathLike | None) -> list[str] | None:
    if prompts is None:
        return None
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts)
    return list(prompts)


def open_bench(base: Any, model: Any, prompts: Any, max_tokens: int, *, spectra: bool,
           progress: Any, rows: int, chat: bool = False, tokenizer: Any = None) -> tuple[TensorSource, TensorSource, dict[str, Scan], Bench, str | None]:
    # Mapped: a tensor is a view of the page cache, not a copy of it (each row reads both
    # models whole: a copy was about 0.4 CPU-s a row on SmolLM2); each is let go once used.
    base_src, target_src = open_model(base, mapped=True), open_model(model, mapped=True)
    _check_pair(base_src, target_src)
    texts = _prompts(prompts)
    skipped = None
    hf_model = None
    if texts is None:
        skipped = "no prompts given"
    else:
        folder = base_src.folder if base_src.path is not None else None
        if folder is None:
            skipped = "the base is not a model folder"
        else:
            # Refuses a folder without config.json, or without a tokenizer where none is given.
            hf_model, tokenizer = load_causal_lm(folder, tokenizer=tokenizer)
    bench = Bench(base_src, target_src, model=hf_model, probe=None, progress=progress, rows=rows + 1)
    scans = _scan(base_src, target_src, spectra=spectra)
    bench.done += len(bench.names)
    if hf_model is not None:
        bench.load_target()
        bench.probe = FidelityProbe(hf_model, texts, tokenizer=tokenizer, max_tokens=max_tokens, chat=chat)
        bench.prompts = len(texts)
    return base_src, target_src, scans, bench, skipped
