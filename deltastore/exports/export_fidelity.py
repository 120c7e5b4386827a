"""How much of a stored version an export keeps: KL and top-1 of exactly what was written.

This module owns ``export-lora --prompts FILE [--max-kl K]``: the base is loaded as a Hugging
Face model (fidelity.load_causal_lm), the version's weights are put into it, and a
``FidelityProbe`` keeps their next-token distributions. Each export is then read back from the
file(s) written (a PEFT folder through lora.adapter_weights, a GGUF LoRA through
gguf_lora.read_gguf_lora), merged into the base's weights in memory (W + B @ A * scaling, dropped
tensors left at the base), and measured against the version. The base alone is measured too:
what exporting nothing would give (DESIGN.md, "Fidelity").

``--max-kl K`` writes exports of ranks 1, 2, 4, ... up to the rank asked, each into a temporary
place beside ``out``, measures each as above, and keeps the smallest whose KL is at most K (a
binary search: KL is taken to fall as the rank grows). Only that one is moved to ``out``.

It never imports click, prints or exits; it writes nothing but the export (and its temporary
candidates, removed on every way out).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TYPE_CHECKING

import torch

from ..patching.apply import match_names, module_tensors
from ..core.errors import DeltastoreError
from ..metrics.fidelity import Fidelity, FidelityProbe, load_causal_lm, read_prompts
from .gguf_lora import export_gguf_lora, read_gguf_lora
from .gguf_model import export_gguf, read_gguf_model
from .lora import adapter_weights, export_lora
from .vllm_lora import DEFAULT_MAX_RANK, export_vllm_lora

if TYPE_CHECKING:  # Store for types only: nothing here needs store.py loaded
    from ..store import Store

__all__ = ["ExportBench", "ExportFidelity", "KlNotReached", "MeasuredExport", "export_gguf_measured",
           "export_lora_measured", "export_measured", "rank_ladder"]


class KlNotReached(DeltastoreError, ValueError):
    """No rank up to the largest allowed keeps the export's KL under --max-kl."""

    def __init__(self, max_kl: float, rank: int, kl: float):
        self.max_kl, self.rank, self.kl = max_kl, rank, kl
        super().__init__(f"no export of rank up to {rank} stays under --max-kl {max_kl:g} (rank {rank} gives KL "
                         f"{kl:.4g}); allow a larger rank (--rank / --max-rank) or a larger --max-kl")


@dataclass(frozen=True)
class ExportFidelity:
    """The export's KL(stored version || export) and top-1 agreement over the prompts; the base
    alone's (exporting nothing), and the stored version's own fidelity to the fine-tune it was
    committed from, where ``commit --prompts`` recorded it (else None)."""

    kl: float
    top1: float
    base_kl: float
    base_top1: float
    stored_kl: float | None
    stored_top1: float | None
    prompts: int
    positions: int


@dataclass(frozen=True)
class MeasuredExport:
    """An export (what the writer returned), its fidelity, and each rank tried with its KL."""

    export: Any
    fidelity: ExportFidelity
    tried: tuple[tuple[int, float], ...]


def _recorded(metadata: Mapping[str, str], key: str) -> float | None:
    try:
        return float(metadata[key])
    except (KeyError, ValueError):
        return None


class ExportBench:
    """One Hugging Face model of the base holding, on request, the stored version or an export
    of it; the probe's reference is the stored version."""

    def __init__(self, store: Store, ref: str, prompts: Sequence[str] | str | os.PathLike, *,
                 base_weights: Any = None, tokenizer: str | os.PathLike | None = None,
                 max_tokens: int = 256, chat: bool = False):
        texts = read_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else list(prompts)
        self.version = store.resolve(ref)
        base = store.base(self.version.base_id)
        self.source = store.base_source(base, base_weights)
        if self.source.folder is None or not (Path(self.source.folder) / "config.json").is_file():
            raise DeltastoreError("measuring an export needs the base as a Hugging Face model folder "
                                  "(config.json, safetensors weights, a tokenizer); give --base-path FOLDER")
        self.model, tok = load_causal_lm(self.source.folder, tokenizer=tokenizer)
        infos, tensor = store.materialize(self.version, base_weights=self.source)
        base_ids = {n: r["tensor_id"] for n, r in store.base_tensors(base).items()}
        self.changed = [e.name for e in self.version.tensors if e.result_tensor_id != base_ids.get(e.name)]
        names = list(self.source.names)
        current = module_tensors(self.model, names)
        mapping = match_names(names, set(current))
        self.params = {n: current[mapping[n]] for n in names if n in mapping}
        for name in self.changed:
            self._put(name, tensor(name))
        self.probe = FidelityProbe(self.model, texts, tokenizer=tok, max_tokens=max_tokens, chat=chat)
        self.prompts = len(texts)
        self._base: Fidelity | None = None

    def _put(self, name: str, value: torch.Tensor) -> None:
        param = self.params[name]
        with torch.no_grad():
            param.copy_(value.to(device=param.device, dtype=param.dtype))

    def measure(self, weights: Mapping[str, torch.Tensor]) -> Fidelity:
        """Fidelity of the model holding ``weights`` (name -> tensor) and the base's own tensor
        for every other tensor the version changed."""
        for name in dict.fromkeys([*self.changed, *weights]):
            self._put(name, weights[name] if name in weights else self.source.get(name))
        return self.probe.measure()

    def base_fidelity(self) -> Fidelity:
        if self._base is None:
            self._base = self.measure({})
        return self._base

    def result(self, fidelity: Fidelity) -> ExportFidelity:
        base = self.base_fidelity()
        meta = self.version.metadata
        return ExportFidelity(fidelity.kl, fidelity.top1, base.kl, base.top1, _recorded(meta, "fidelity.kl"),
                              _recorded(meta, "fidelity.top1"), self.prompts, fidelity.positions)


def merged(source: Any, deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each weight of ``deltas`` added to the base's, in float32 and rounded once to the base's
    dtype (as PEFT's merge and llama.cpp's f32 compute of an f16/bf16 weight round it)."""
    out = {}
    for name, delta in deltas.items():
        w = source.get(name)
        out[name] = (w.to(torch.float32) + delta.to(torch.float32)).to(w.dtype)
    return out


def rank_ladder(top: int) -> list[int]:
    """1, 2, 4, ... below ``top``, then ``top``."""
    ladder, r = [], 1
    while r < top:
        ladder.append(r)
        r *= 2
    return ladder + [top]


def export_measured(bench: ExportBench, out: str | os.PathLike, *, write: Callable[[Path, int], Any],
                    read_back: Callable[[Path], Mapping[str, torch.Tensor]], rank: int,
                    max_kl: float | None = None, progress: Callable[[int, int], None] | None = None
                    ) -> MeasuredExport:
    """``write(path, rank)`` an export to ``out`` and measure what ``read_back(path)`` (the
    merged weights) gives; with ``max_kl``, the smallest rank of ``rank_ladder(rank)`` whose KL
    is at most ``max_kl`` (``KlNotReached`` where even ``rank`` is above it; nothing is written)."""
    out = Path(out)
    if max_kl is not None and not (isinstance(max_kl, (int, float)) and max_kl >= 0):
        raise DeltastoreError(f"--max-kl must be a number of at least 0, got {max_kl!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DeltastoreError(f"{out} exists; choose a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tried: dict[int, tuple[float, Fidelity, Any, Path]] = {}

    def attempt(r: int) -> tuple[float, Fidelity, Any, Path]:
        if r not in tried:
            path = work / f"rank-{r}" / out.name
            path.parent.mkdir()
            written = write(path, r)
            fidelity = bench.measure(read_back(path))
            tried[r] = (fidelity.kl, fidelity, written, path)
            if progress:
                progress(len(tried), len(tried) + 1)
        return tried[r]

    try:
        if max_kl is None:
            chosen = rank
        else:
            ladder = rank_ladder(rank)
            kl_top = attempt(ladder[-1])[0]
            if kl_top > max_kl:
                raise KlNotReached(max_kl, ladder[-1], kl_top)
            lo, hi = 0, len(ladder) - 1  # ladder[hi] fits
            while lo < hi:
                mid = (lo + hi) // 2
                if attempt(ladder[mid])[0] <= max_kl:
                    hi = mid
                else:
                    lo = mid + 1
            chosen = ladder[hi]
        _, fidelity, written, path = attempt(chosen)
        if out.exists() and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists():
            raise DeltastoreError(f"{out} exists; choose a new one")
        os.replace(path, out)
        written = _moved(written, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return MeasuredExport(written, bench.result(fidelity),
                          # The rank each export holds at most (a rank above every matrix's side is that side).
                          tuple(sorted((_rank(w, r), kl) for r, (kl, _, w, _) in tried.items())))


def _rank(written: Any, asked: int) -> int:
    rank = getattr(written, "rank", None)
    return rank if isinstance(rank, int) else asked


def _moved(written: Any, out: Path) -> Any:
    """The writer's result, naming where the export now is."""
    try:
        return replace(written, out=out)
    except TypeError:
        return written


def export_lora_measured(store: Store, ref: str, out: str | os.PathLike, *, prompts: Sequence[str] | str | os.PathLike,
                         fmt: str = "peft", server: str | None = None, rank: int | None = None,
                         energy: float | None = None, dtype: str = "bf16", max_rank: int | None = None,
                         max_kl: float | None = None, base_weights: Any = None,
                         tokenizer: str | os.PathLike | None = None, chat: bool = False, max_tokens: int = 256,
                         exact: bool = False, progress: Any = None) -> MeasuredExport:
    """``export-lora --prompts``: a PEFT adapter (``server="vllm"``: vLLM's profile, ranks
    capped at ``max_rank``) or a GGUF LoRA (``fmt="gguf"``, ``dtype`` f32/f16/bf16/q8_0), with
    the fidelity of what was written; ``max_kl`` searches the rank as ``export_measured`` does,
    up to ``rank`` (default ``DEFAULT_SEARCH_RANK``, or ``max_rank`` for vLLM)."""
    if rank is None and energy is None and max_kl is None and server is None:
        raise DeltastoreError("give a rank (--rank R), an energy fraction (--energy F) or --max-kl K")
    bench = ExportBench(store, ref, prompts, base_weights=base_weights, tokenizer=tokenizer, chat=chat,
                        max_tokens=max_tokens)
    source = bench.source
    # No pair is of a rank above its matrix's smaller side: a search stops at the widest.
    widest = max((min(i.shape) for i in source.infos.values() if len(i.shape) == 2), default=1)
    if server == "vllm":
        cap = DEFAULT_MAX_RANK if max_rank is None else max_rank
        top = min(min(rank, cap) if rank is not None else cap, widest)

        def write(path: Path, r: int) -> Any:
            return export_vllm_lora(store, ref, path, max_rank=cap, rank=r, energy=energy, dtype=dtype,
                                    base_weights=source)
    elif fmt == "gguf":
        top = min(rank if rank is not None else DEFAULT_SEARCH_RANK, widest)

        def write(path: Path, r: int) -> Any:
            # Without --rank, --energy alone sets each pair's rank (the search caps it).
            return export_gguf_lora(store, ref, path, rank=r if (rank is not None or max_kl is not None) else None,
                                    energy=energy, dtype=dtype, base_weights=source)

        return export_measured(bench, out, write=write, read_back=lambda path: merged(source, read_gguf_lora(
            path, source)), rank=top, max_kl=max_kl, progress=progress)
    else:
        top = min(rank if rank is not None else DEFAULT_SEARCH_RANK, widest)

        def write(path: Path, r: int) -> Any:
            return export_lora(store, ref, path, rank=r if (rank is not None or max_kl is not None) else None,
                               energy=energy, dtype=dtype, base_weights=source, exact=exact)

    def read_back(path: Path) -> dict[str, torch.Tensor]:
        weights = adapter_weights(path, source)
        return {name: weights.target.get(name) for name in [*weights.deltas, *weights.replaced]}

    return export_measured(bench, out, write=write, read_back=read_back, rank=top, max_kl=max_kl,
                           progress=progress)


def export_gguf_measured(store: Store, ref: str, out: str | os.PathLike, *, prompts: Sequence[str] | str | os.PathLike,
                         dtype: str = "f16", base_weights: Any = None, tokenizer: str | os.PathLike | None = None,
                         chat: bool = False, max_tokens: int = 256, progress: Any = None) -> MeasuredExport:
    """``export --format gguf --prompts``: the merged GGUF model, with the fidelity of what was
    written (read back by gguf_model.read_gguf_model) against the stored version."""
    bench = ExportBench(store, ref, prompts, base_weights=base_weights, tokenizer=tokenizer, chat=chat,
                        max_tokens=max_tokens)
    source = bench.source
    return export_measured(
        bench, out, write=lambda path, _: export_gguf(store, ref, path, dtype=dtype, base_weights=source),
        read_back=lambda path: read_gguf_model(path, source), rank=1, progress=progress)


#: The largest rank ``--max-kl`` tries when no --rank is given.
DEFAULT_SEARCH_RANK = 128
