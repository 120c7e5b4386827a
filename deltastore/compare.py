"""What each way of storing a fine-tune costs, and how much of its behaviour it keeps.

This module owns the store- and model-facing half of the measurements (the arithmetic is in
analysis.py, the next-token KL in fidelity.py):

- ``compare``: one row per way of storing a fine-tune (nothing, the full copy, the full model
  quantised, every delta encoding, a LoRA of each rank, any selection) with its bytes and,
  where the base is a Hugging Face folder and prompts are given, its fidelity;
- ``choose_encoding`` and ``commit_measured``: ``commit --encoding auto --max-kl K``;
- ``analyze``: per (layer, module kind), what the tensors a stored version applies changed
  (and, with ``alpha=True``, WeightWatcher's alpha before and after: alpha.py);
- ``plot``: size against KL, one labelled point per row.

Bytes are those the store would write: each tensor is encoded and each part compressed as
objects.py compresses it (header included), without writing anything. It works tensor by
tensor: ONE model is loaded, each row's reconstructed tensors are copied into it in place, the
``FidelityProbe`` measures whatever weights it holds, and the fine-tune is put back before the
next row. Peak memory is that model plus a few tensors in flight. It never writes to a store
(``commit_measured`` commits through ``Store.commit``), never prints and never loads a pickle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import encodings as codecs
from .alpha import AlphaShift, alpha_shift, load_weightwatcher, matrix_alpha, summarize_alpha
from .analysis import ModuleChange, TensorChange, singular_values, summarize, tensor_change
from .commit import _spec_chooser, delta_stats, in_order
from .errors import DeltastoreError, EncodingError
from .fidelity import Fidelity, FidelityProbe, load_causal_lm, read_prompts
from .hashing import dtype_name
from .models import TensorSource, open_model
from .objects import stored_size
from .selection import select as select_tensors, TensorDelta

__all__ = [
    "AUTO_CANDIDATES",
    "AutoChoice",
    "CompareError",
    "Comparison",
    "DEFAULT_ENCODINGS",
    "DEFAULT_RANKS",
    "FULL_QUANTIZED",
    "MeasuredCommit",
    "RefAnalysis",
    "Row",
    "Select",
    "analyze",
    "choose_encoding",
    "commit_measured",
    "compare",
    "parse_select",
    "plot",
    "spectra",
    "spectrum_plot",
    "Spectra",
]

DEFAULT_ENCODINGS: tuple[str, ...] = ("lossless", "int8", "int4", "nf4", "fp4", "1bit")
DEFAULT_RANKS: tuple[int, ...] = (8, 32)
#: The full model itself quantised (the "quantized full model" a user might keep instead).
FULL_QUANTIZED: tuple[str, ...] = ("int4", "nf4")
#: What ``commit --encoding auto`` chooses from; ranks a matrix cannot hold are skipped.
AUTO_CANDIDATES: tuple[str, ...] = ("lossless", "int8", "int4", "nf4", "fp4", "1bit",
                                    "lowrank:8", "lowrank:32", "lowrank:128")
SELECT_KEYS = ("include", "exclude", "top_k", "min_rel_change", "energy", "encoding")


class CompareError(DeltastoreError, ValueError):
    """A comparison that cannot be made: models that do not match, a bad selection spec, ..."""


# ---------------------------------------------------------------------------------------------
# What the user asks for


@dataclass(frozen=True)
class Select:
    """A user's selection, as ``--select`` spells it: ``KEY=VALUE`` pairs joined by ``;``, keys
    ``include``, ``exclude`` (regexes), ``top_k``, ``min_rel_change``, ``energy`` (numbers) and
    ``encoding`` (of the tensors kept; lossless by default)."""

    text: str
    include: str | None = None
    exclude: str | None = None
    top_k: int | None = None
    min_rel_change: float | None = None
    energy: float | None = None
    encoding: str = "lossless"


def parse_select(text: str) -> Select:
    """``'include=layers\\.15\\.self_attn\\.v_proj'``, ``'top_k=2'``, ``'energy=0.9;encoding=int4'``."""
    values: dict[str, Any] = {}
    for pair in text.split(";"):
        key, eq, value = pair.strip().partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in SELECT_KEYS or not value:
            raise CompareError(f"--select {text!r}: each part must be KEY=VALUE with KEY one of "
                               f"{', '.join(SELECT_KEYS)} (joined by ';'), e.g. 'top_k=2' or "
                               "'include=layers\\.15\\.;encoding=int4'")
        if key in values:
            raise CompareError(f"--select {text!r} gives {key} twice")
        try:
            if key == "top_k":
                values[key] = int(value)
            elif key in ("min_rel_change", "energy"):
                values[key] = float(value)
            else:
                values[key] = value
        except ValueError:
            raise CompareError(f"--select {text!r}: {key} must be a number, got {value!r}") from None
    if "encoding" in values:
        codecs.get(values["encoding"])
    return Select(text, **values)


@dataclass(frozen=True)
class Row:
    """One way of storing the fine-tune.

    ``kind``: base, full, full-quantized, delta, lora or selection. ``bytes`` as the store (or,
    for LoRA, the adapter file) would hold them; ``fraction`` of the full copy. ``energy``: for
    a LoRA row, the mean over its matrices of the fraction of each delta's energy that rank R
    holds; for a selection, the fraction of the whole delta's energy it keeps. ``kl``/``top1``
    are None where fidelity was not measured.
    """

    label: str
    kind: str
    spec: str | None
    bytes: int
    fraction: float
    tensors: int
    energy: float | None = None
    kl: float | None = None
    top1: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Comparison:
    """Every row, and what they were measured on. ``fidelity_skipped`` says why ``kl`` is None
    (None when fidelity was measured)."""

    base: str
    model: str
    tensors: int
    changed: int
    full_bytes: int
    dtype: str
    prompts: int
    positions: int
    fidelity_skipped: str | None
    rows: tuple[Row, ...]

    def row(self, label: str) -> Row:
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(label)


# ---------------------------------------------------------------------------------------------
# The bench: one model, rows measured one after another


@dataclass(frozen=True)
class _Scan:
    changed: bool
    rel_change: float | None
    energy: float
    spectrum: tuple[float, ...] | None  # changed float 2-D tensors, when ranks are asked for


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.numel() == 0 or bool(np.array_equal(np.asarray(_raw(a)), np.asarray(_raw(b))))


def _parts_size(encoded: codecs.Encoded) -> int:
    # As version.bytes counts them: every part an object of its own, shared ones in full.
    return sum(stored_size(part) for part in encoded.parts.values())


# A work function: tensor name -> (bytes, whether it is stored, the tensor the model should
# hold for this row, or None for "the fine-tune's own").
Work = Callable[[str], tuple[int, bool, "torch.Tensor | None"]]


class _Bench:
    def __init__(self, base: TensorSource, target: TensorSource, *, model: torch.nn.Module | None,
                 probe: FidelityProbe | None, progress: Callable[[int, int], None] | None, rows: int):
        self.base, self.target = base, target
        self.names = target.names
        self.model, self.probe = model, probe
        self.params: dict[str, torch.Tensor] = {}
        self.dirty: set[str] = set()  # parameters holding another row's tensor, not the fine-tune's
        self._sizing = False  # a row run for its bytes alone
        if model is not None:
            from .apply import match_names, module_tensors

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


def _scan(base: TensorSource, target: TensorSource, *, spectra: bool) -> dict[str, _Scan]:
    def work(name: str) -> _Scan:
        b, t = base.get(name), target.get(name)
        if _same(b, t):
            return _Scan(False, 0.0, 0.0, None)
        rel, energy = delta_stats(b, t)
        spectrum = None
        if spectra and t.dim() == 2 and t.is_floating_point() and b.shape == t.shape:
            spectrum = tuple(singular_values(t.to(torch.float32) - b.to(torch.float32)).tolist())
        return _Scan(True, rel, energy, spectrum)
    return dict(in_order(target.names, work))


def _prompts(prompts: Sequence[str] | str | os.PathLike | None) -> list[str] | None:
    if prompts is None:
        return None
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts)
    return list(prompts)


def _setup(base: Any, model: Any, prompts: Any, max_tokens: int, *, spectra: bool,
           progress: Any, rows: int, chat: bool = False, tokenizer: Any = None) -> tuple[TensorSource, TensorSource, dict[str, _Scan], _Bench, str | None]:
    base_src, target_src = open_model(base), open_model(model)
    _check_pair(base_src, target_src)
    texts = _prompts(prompts)
    skipped = None
    hf_model = probe = None
    if texts is None:
        skipped = "no prompts given"
    else:
        folder = base_src.folder if base_src.path is not None else None
        if folder is None:
            skipped = "the base is not a model folder"
        else:
            # Refuses a folder without config.json, or without a tokenizer where none is given.
            hf_model, tokenizer = load_causal_lm(folder, tokenizer=tokenizer)
    bench = _Bench(base_src, target_src, model=hf_model, probe=None, progress=progress, rows=rows + 1)
    scans = _scan(base_src, target_src, spectra=spectra)
    bench.done += len(bench.names)
    if hf_model is not None:
        bench.load_target()
        bench.probe = FidelityProbe(hf_model, texts, tokenizer=tokenizer, max_tokens=max_tokens, chat=chat)
        bench.prompts = len(texts)
    return base_src, target_src, scans, bench, skipped


# ---------------------------------------------------------------------------------------------
# Rows


def _delta_work(bench: _Bench, scans: Mapping[str, _Scan], spec: str, options: Mapping[str, Any],
                kept: set[str] | None = None, rules: Sequence[tuple[str, str]] | None = None) -> Work:
    # The very choice commit makes, tensor by tensor (norms lossless, ranks checked, rules).
    choose = _spec_chooser(spec, list(rules or []), dict(options), bench.target)

    def work(name: str):
        if not scans[name].changed:
            return 0, False, None
        if kept is not None and name not in kept:
            return 0, False, bench.base.get(name)
        b, t = bench.base.get(name), bench.target.get(name)
        enc = choose(name, b, t)
        encoded = enc.encode(b, t)
        value = None
        if bench.measuring and not enc.exact:
            value = enc.decode(b, encoded, dtype=t.dtype, shape=tuple(t.shape))
        return _parts_size(encoded), True, value
    return work


def _full_quantized_work(bench: _Bench, spec: str) -> Work:
    enc = codecs.get(spec)

    def work(name: str):
        t = bench.target.get(name)
        if t.dim() < 2 or not t.is_floating_point():
            return stored_size(_raw(t)), True, None
        zero = torch.zeros_like(t)
        encoded = enc.encode(zero, t)
        value = enc.decode(zero, encoded, dtype=t.dtype, shape=tuple(t.shape)) if bench.measuring else None
        return _parts_size(encoded), True, value
    return work


def _lora_work(bench: _Bench, scans: Mapping[str, _Scan], the_plan: Any, rank: int, dtype: str) -> Work:
    itemsize = codecs.Q.FACTOR_DTYPES[dtype].itemsize

    def work(name: str):
        if not scans[name].changed:
            return 0, False, None
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in the_plan.targets:
            shape = the_plan.targets[module][1]
            r = min(rank, min(shape))
            value = None
            if bench.measuring:
                b, t = bench.base.get(name), bench.target.get(name)
                enc = codecs.LowRank(r, dtype=dtype)
                value = enc.decode(b, enc.encode(b, t), dtype=t.dtype, shape=tuple(t.shape))
            return r * (shape[0] + shape[1]) * itemsize, True, value
        if name in the_plan.saved:
            return 0, True, None  # counted whole, below
        return 0, False, bench.base.get(name)
    return work


def _fid(fidelity: Fidelity | None) -> dict[str, float | None]:
    return {"kl": fidelity.kl if fidelity else None, "top1": fidelity.top1 if fidelity else None}


def compare(base: Any, model: Any, *, encodings: Sequence[str] = DEFAULT_ENCODINGS,
            ranks: Sequence[int] = DEFAULT_RANKS, selections: Sequence[str | Select] = (),
            prompts: Sequence[str] | str | os.PathLike | None = None,
            full: Sequence[str] = FULL_QUANTIZED, lora_dtype: str = "bf16",
            encoding_options: Mapping[str, Any] | None = None, max_tokens: int = 256, chat: bool = False,
            tokenizer: str | os.PathLike | None = None,
            progress: Callable[[int, int], None] | None = None) -> Comparison:
    """Every way of storing fine-tune ``model`` of ``base``, with its bytes and fidelity.

    ``base``/``model``: a .safetensors file, a model folder, a state dict or a module. Fidelity
    is measured when ``prompts`` (a list, or a file with one per line) are given; the base must
    then be a Hugging Face model folder; with ``chat`` each prompt is a user message put through
    the tokenizer's chat template. ``encodings``: delta encodings (any spec, lowrank:R
    included); ``ranks``: LoRA ranks; ``selections``: ``Select`` or its ``--select`` text;
    ``full``: encodings for the whole model quantised; ``lora_dtype``: of the LoRA factors;
    ``tokenizer``: a folder or tokenizer.json, where the base folder has no tokenizer.
    """
    from .lora import module_types, plan as lora_plan

    options = dict(encoding_options or {})
    specs = list(encodings)
    for spec in specs:
        codecs.get(spec, **options)
    for spec in full:
        if codecs.get(spec).exact or spec.startswith("lowrank"):
            raise CompareError(f"the full model quantised as {spec!r} makes no sense: use int8, int4, nf4, fp4 or 1bit")
    ranks = [int(r) for r in ranks]
    if any(r <= 0 for r in ranks):
        raise CompareError(f"LoRA ranks must be positive whole numbers, got {ranks}")
    if lora_dtype not in codecs.Q.FACTOR_DTYPES:
        raise CompareError(f"the LoRA dtype must be one of {', '.join(codecs.Q.FACTOR_DTYPES)}, got {lora_dtype!r}")
    chosen = [s if isinstance(s, Select) else parse_select(s) for s in selections]
    rows_asked = 2 + len(full) + len(specs) + len(ranks) + len(chosen)
    base_src, target_src, scans, bench, skipped = _setup(
        base, model, prompts, max_tokens, spectra=bool(ranks), progress=progress, rows=rows_asked, chat=chat,
        tokenizer=tokenizer)
    measuring = bench.measuring
    full_bytes = target_src.nbytes
    changed = [n for n in target_src.names if scans[n].changed]
    rows: list[Row] = []

    def add(label: str, kind: str, spec: str | None, nbytes: int, tensors: int,
            fidelity: Fidelity | None, energy: float | None = None, note: str = "", exact: bool = False) -> None:
        kl, top1 = (0.0, 1.0) if (exact and measuring) else (_fid(fidelity)["kl"], _fid(fidelity)["top1"])
        rows.append(Row(label, kind, spec, nbytes, nbytes / full_bytes if full_bytes else 0.0, tensors,
                        energy, kl, top1, note))

    # Nothing kept: the base itself, the reference point.
    _, _, fidelity = bench.run(lambda n: (0, False, bench.base.get(n) if scans[n].changed else None))
    add("base (nothing kept)", "base", None, 0, 0, fidelity, note=f"{len(changed)} tensors differ from the fine-tune")
    dtype = _main_dtype(target_src)
    add(f"full copy ({dtype})", "full", None, full_bytes, len(target_src.names), None, exact=True)
    nbytes, stored, _ = bench.run(lambda n: (stored_size(_raw(bench.target.get(n))), True, None), measure=False)
    add("full copy, zstd", "full", "zstd", nbytes, stored, None, exact=True)
    for spec in full:
        nbytes, stored, fidelity = bench.run(_full_quantized_work(bench, spec))
        add(f"full model {spec}", "full-quantized", spec, nbytes, stored, fidelity,
            note="2-D tensors quantised, others kept")
    for spec in specs:
        enc = codecs.get(spec, **options)
        nbytes, stored, fidelity = bench.run(_delta_work(bench, scans, spec, options), measure=not enc.exact)
        add(f"delta {enc.spec}", "delta", enc.spec, nbytes, stored, fidelity, exact=enc.exact and measuring)
    if ranks:
        the_plan = lora_plan(target_src.infos, changed, types=module_types(base_src.folder))
        whole = sum(target_src.infos[n].nbytes for n in the_plan.saved)
        note = []
        if the_plan.saved:
            note.append(f"{len(the_plan.saved)} tensors whole ({_size(whole)})")
        if the_plan.dropped:
            note.append(f"{len(the_plan.dropped)} dropped (base)")
        for rank in ranks:
            nbytes, stored, fidelity = bench.run(_lora_work(bench, scans, the_plan, rank, lora_dtype))
            spectra = [scans[f"{m}.weight"].spectrum for m in the_plan.targets]
            held = [_held(s, min(rank, min(the_plan.targets[m][1])))
                    for m, s in zip(the_plan.targets, spectra) if s is not None]
            add(f"LoRA r={rank}", "lora", f"lowrank:{rank}", nbytes + whole, stored, fidelity,
                energy=sum(held) / len(held) if held else None, note=", ".join(note))
    if chosen:
        deltas = {n: TensorDelta(rel_change=scans[n].rel_change if scans[n].rel_change is not None else math.inf,
                                 energy=scans[n].energy) for n in changed}
        for sel in chosen:
            picked = select_tensors(deltas, include=sel.include, exclude=sel.exclude, top_k=sel.top_k,
                                    min_rel_change=sel.min_rel_change, energy=sel.energy)
            nbytes, stored, fidelity = bench.run(
                _delta_work(bench, scans, sel.encoding, options, kept=set(picked.kept)))
            add(f"select {sel.text}", "selection", sel.encoding, nbytes, stored, fidelity,
                energy=1.0 - picked.left_out_energy_fraction,
                note=f"{len(picked.kept)} of {len(changed)} changed tensors")
    return Comparison(
        base=str(base_src.path) if base_src.path else "(in memory)",
        model=str(target_src.path) if target_src.path else "(in memory)",
        tensors=len(target_src.names), changed=len(changed), full_bytes=full_bytes, dtype=dtype,
        prompts=bench.prompts,
        positions=bench.probe.positions if bench.probe else 0,
        fidelity_skipped=skipped, rows=tuple(rows))


def _held(spectrum: Sequence[float], rank: int) -> float:
    total = math.fsum(s * s for s in spectrum)
    return 1.0 if total == 0.0 else min(1.0, math.fsum(s * s for s in spectrum[:rank]) / total)


def _main_dtype(source: TensorSource) -> str:
    by_dtype: dict[str, int] = {}
    for info in source.infos.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    name = max(by_dtype, key=by_dtype.get) if by_dtype else "F32"
    return {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64"}.get(name, name.lower())


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


# ---------------------------------------------------------------------------------------------
# commit --encoding auto


@dataclass(frozen=True)
class AutoChoice:
    """The encoding chosen (the smallest whose KL is at most ``max_kl``; or the one asked for),
    its measured fidelity and bytes, the base's own KL, and every candidate measured."""

    encoding: str
    kl: float
    top1: float
    bytes: int
    max_kl: float | None
    base_kl: float
    positions: int
    candidates: tuple[Row, ...]


def choose_encoding(base: Any, model: Any, *, prompts: Sequence[str] | str | os.PathLike,
                    max_kl: float | None, candidates: Sequence[str] = AUTO_CANDIDATES,
                    include: str | None = None, exclude: str | None = None, top_k: int | None = None,
                    min_rel_change: float | None = None, energy: float | None = None,
                    encoding_for: Sequence[tuple[str, str]] | None = None,
                    encoding_options: Mapping[str, Any] | None = None, max_tokens: int = 256,
                    chat: bool = False, tokenizer: str | os.PathLike | None = None,
                    progress: Callable[[int, int], None] | None = None) -> AutoChoice:
    """Measure each candidate encoding (under the selection given) and pick the smallest by
    bytes whose KL(fine-tuned || stored) is at most ``max_kl``; ties go to the lower KL. With
    ``max_kl`` None, ``candidates`` must be one encoding, which is measured."""
    if max_kl is not None and (not isinstance(max_kl, (int, float)) or not math.isfinite(max_kl) or max_kl < 0):
        raise CompareError(f"--max-kl must be a number of at least 0 (nats per token), got {max_kl!r}")
    if max_kl is None and len(candidates) != 1:
        raise CompareError("choosing an encoding needs --max-kl K: the largest KL(fine-tuned || stored) to accept")
    options = dict(encoding_options or {})
    base_src, target_src, scans, bench, skipped = _setup(
        base, model, prompts, max_tokens, spectra=False, progress=progress, rows=len(candidates) + 1, chat=chat,
        tokenizer=tokenizer)
    if bench.probe is None:
        raise CompareError(f"cannot measure fidelity: {skipped}")
    full_bytes = target_src.nbytes
    changed = [n for n in target_src.names if scans[n].changed]
    kept = None
    if any(x is not None for x in (include, exclude, top_k, min_rel_change, energy)):
        deltas = {n: TensorDelta(rel_change=scans[n].rel_change if scans[n].rel_change is not None else math.inf,
                                 energy=scans[n].energy) for n in changed}
        kept = set(select_tensors(deltas, include=include, exclude=exclude, top_k=top_k,
                                  min_rel_change=min_rel_change, energy=energy).kept)
    _, _, base_fid = bench.run(lambda n: (0, False, bench.base.get(n) if scans[n].changed else None))
    # Pass 1: every candidate's bytes, without reconstructing anything (encoding is the cheap
    # half). Pass 2: fidelity, smallest first, until one fits: a forward pass over the prompts
    # per candidate is the dear half, and those larger than the first that fits need none.
    works: dict[str, Work] = {}
    sized: dict[str, tuple[int, int]] = {}
    skipped: dict[str, str] = {}
    for spec in candidates:
        try:
            works[spec] = _delta_work(bench, scans, spec, options, kept=kept, rules=encoding_for)
        except EncodingError as e:
            if len(candidates) == 1:
                raise
            skipped[spec] = f"skipped: {e}"
            continue
        nbytes, stored, _ = bench.run(works[spec], measure=False)
        sized[spec] = (nbytes, stored)
    measured: dict[str, Fidelity] = {}
    pick = None
    for spec in sorted(sized, key=lambda s: (sized[s][0], candidates.index(s))):
        if codecs.get(spec, **options).exact:
            fidelity = Fidelity(0.0, 1.0, bench.probe.positions)  # bit for bit the fine-tune
        else:
            fidelity = bench.run(works[spec])[2]
        measured[spec] = fidelity
        if max_kl is None or fidelity.kl <= max_kl:
            pick = spec
            break
    rows = []
    for spec in candidates:
        if spec in skipped:
            rows.append(Row(f"delta {spec}", "delta", spec, 0, 0.0, 0, note=skipped[spec]))
            continue
        nbytes, stored = sized[spec]
        fidelity = measured.get(spec)
        if fidelity is None:
            note = f"not measured: larger than {pick} ({_size(nbytes)} against {_size(sized[pick][0])})"
        elif spec == pick:
            note = "chosen: the smallest within --max-kl" if max_kl is not None else "measured"
        else:
            note = f"rejected: KL {fidelity.kl:.3g} is above --max-kl {max_kl:g}"
        rows.append(Row(f"delta {spec}", "delta", spec, nbytes, nbytes / full_bytes if full_bytes else 0.0,
                        stored, None, fidelity.kl if fidelity else None, fidelity.top1 if fidelity else None,
                        note))
    if pick is None and len(candidates) == 1 and measured:
        only = next(iter(measured))
        raise CompareError(f"{only} gives KL {measured[only].kl:.3g}, more than --max-kl {max_kl:g}; "
                           "nothing was committed: choose a finer encoding, or --encoding auto")
    if pick is None:
        if not measured:
            raise CompareError("no candidate encoding can store this model: "
                               + "; ".join(f"{s}: {why}" for s, why in skipped.items()))
        best = min(measured, key=lambda s: measured[s].kl)
        raise CompareError(f"no encoding keeps KL at most {max_kl:g}: the lowest is {measured[best].kl:.3g} "
                           f"({best}); raise --max-kl, or keep more tensors")
    chosen = measured[pick]
    return AutoChoice(pick, chosen.kl, chosen.top1, sized[pick][0], max_kl, base_fid.kl,
                      bench.probe.positions, tuple(rows))


@dataclass(frozen=True)
class MeasuredCommit:
    result: Any  # the CommitResult
    choice: AutoChoice


def commit_measured(store: Any, stance: str, model: Any, *, base: Any, prompts: str | os.PathLike | Sequence[str],
                    encoding: str = "auto", max_kl: float | None = None, base_weights: Any = None,
                    include: str | None = None, exclude: str | None = None, top_k: int | None = None,
                    min_rel_change: float | None = None, energy: float | None = None,
                    encoding_for: Sequence[tuple[str, str]] | None = None,
                    encoding_options: Mapping[str, Any] | None = None, chat: bool = False,
                    tokenizer: str | os.PathLike | None = None,
                    metadata: Mapping[str, str] | None = None, progress: Callable[[int, int], None] | None = None,
                    **commit_options: Any) -> MeasuredCommit:
    """Commit ``model`` as the next version of ``stance`` with its fidelity measured and recorded
    in the version's metadata (``fidelity.kl``, ``fidelity.top1``, ``fidelity.base_kl``,
    ``fidelity.positions``, ``fidelity.max_kl``). ``encoding="auto"`` picks the smallest encoding whose KL is at
    most ``max_kl`` first. The base's weights must be a Hugging Face model folder."""
    if encoding == "auto" and max_kl is None:
        raise CompareError("--encoding auto needs --max-kl K: the largest KL(fine-tuned || stored) to accept, "
                           "e.g. --max-kl 0.01")
    folder = _base_folder(store, base, base_weights)
    selection = dict(include=include, exclude=exclude, top_k=top_k, min_rel_change=min_rel_change, energy=energy)
    choice = choose_encoding(folder, model, prompts=prompts, max_kl=max_kl,
                             candidates=AUTO_CANDIDATES if encoding == "auto" else (encoding,),
                             encoding_for=encoding_for, encoding_options=encoding_options, chat=chat,
                             tokenizer=tokenizer, progress=progress, **selection)
    meta = {"fidelity.kl": f"{choice.kl:.6g}", "fidelity.top1": f"{choice.top1:.6g}",
            "fidelity.base_kl": f"{choice.base_kl:.6g}", "fidelity.positions": str(choice.positions)}
    if isinstance(prompts, (str, os.PathLike)):
        meta["fidelity.prompts"] = Path(prompts).name
    if chat:
        meta["fidelity.chat"] = "true"
    if max_kl is not None:
        meta["fidelity.max_kl"] = f"{max_kl:g}"
    if encoding == "auto":
        meta["fidelity.chosen_from"] = ",".join(r.spec for r in choice.candidates if r.kl is not None)
    meta.update(metadata or {})
    result = store.commit(stance, model, base=base, base_weights=base_weights, encoding=choice.encoding,
                          encoding_for=list(encoding_for or []), encoding_options=encoding_options, metadata=meta,
                          **selection, **commit_options)
    return MeasuredCommit(result, choice)


def _base_folder(store: Any, base: Any, base_weights: Any) -> Any:
    """Where the base's weights are, for loading it with transformers."""
    if base_weights is not None:
        return base_weights
    if isinstance(base, (str, os.PathLike)) and Path(base).exists():
        return base
    if isinstance(base, (str, os.PathLike)) or hasattr(base, "id"):
        record = store.base(base)
        if not record.source or not Path(record.source).exists():
            raise CompareError(f"the weights of base {record.name or record.id[:19]} are not at "
                               f"{record.source or '(unknown)'}; pass the base model folder (--base-path)")
        return record.source
    return base


# ---------------------------------------------------------------------------------------------
# analyze


@dataclass(frozen=True)
class RefAnalysis:
    """What one version's applied tensors changed against its base: per tensor (``changes``)
    and per (layer, module kind) (``rows``)."""

    ref: str
    version_id: str
    encoding: str
    tensors: int
    rows: tuple[ModuleChange, ...]
    changes: Mapping[str, TensorChange] = field(repr=False, compare=False)
    #: With ``alpha=True``: WeightWatcher's alpha of every tensor in the base and as applied
    #: (``alphas``) and per (layer, module) row (``row_alphas``); None otherwise.
    alphas: Mapping[str, AlphaShift] | None = field(default=None, repr=False, compare=False)
    row_alphas: Mapping[tuple[int | None, str], AlphaShift] | None = field(default=None, repr=False,
                                                                           compare=False)


def _unchanged(base: torch.Tensor) -> TensorChange:
    norm = float(torch.linalg.vector_norm(base.detach(), dtype=torch.float32)) if base.is_floating_point() else 0.0
    matrix = base.dim() == 2
    return TensorChange(shape=tuple(base.shape), base_norm=norm, delta_norm=0.0, rel_change=0.0, energy=0.0,
                        rank90=0 if matrix else None, rank99=0 if matrix else None, singular_values=(),
                        spectrum=())


def _measure(b: torch.Tensor | None, result: torch.Tensor, top: int) -> TensorChange:
    if b is None or b.shape != result.shape or not b.is_floating_point() or not result.is_floating_point():
        size = float(torch.linalg.vector_norm(result.double())) if result.is_floating_point() else 0.0
        return TensorChange(tuple(result.shape), 0.0, size, math.inf, size * size, None, None, ())
    return tensor_change(b, result, top=top)


def analyze(store: Any, refs: Sequence[str], *, base_weights: Any = None, top: int = 5, alpha: bool = False,
            progress: Callable[[int, int], None] | None = None) -> list[RefAnalysis]:
    """For each ref, every tensor apply would produce compared with the base's: relative change,
    energy, effective ranks and top singular values, and their summary per (layer, module).

    ``alpha=True`` adds WeightWatcher's power-law alpha of each matrix in the base and as
    applied (the optional weightwatcher package; ``AlphaUnavailable`` before any work when it
    is missing)."""
    ww = load_weightwatcher() if alpha else None
    # A base matrix's alpha, shared by every ref on that base: (base id, name) -> alpha.
    base_alphas: dict[tuple[str, str], float | None] = {}
    out = []
    versions = [store.resolve(ref) for ref in refs]
    for k, version in enumerate(versions):
        base = store.base(version.base_id)
        source = store.base_source(base, base_weights)
        infos, tensor = store.materialize(version, base_weights=source)
        entries = {e.name for e in version.tensors}

        def work(name: str) -> tuple[TensorChange, torch.Tensor | None, torch.Tensor | None]:
            b = source.get(name) if name in source else None
            stored = name in entries
            result = tensor(name) if stored else b
            change = _measure(b, result, top) if stored else _unchanged(b)
            # The tensors go back to this (main) thread only when their alpha is wanted: the
            # fit prints, so it runs here, one matrix at a time, while workers read the next.
            return (change, b, result) if ww is not None else (change, None, None)

        changes: dict[str, TensorChange] = {}
        alphas: dict[str, AlphaShift] = {}
        for j, (name, (change, b, result)) in enumerate(in_order(list(infos), work)):
            changes[name] = change
            if ww is not None:
                key = (version.base_id, name)
                if key not in base_alphas:
                    base_alphas[key] = matrix_alpha(ww, b)
                # A tensor the version does not store is the base's own: the same alpha.
                tuned = base_alphas[key] if name not in entries else matrix_alpha(ww, result)
                alphas[name] = alpha_shift(base_alphas[key], tuned)
            del b, result  # not held while the next tensor is awaited
            if progress:
                progress(k * len(infos) + j + 1, len(versions) * len(infos))
        out.append(RefAnalysis(version.ref, version.id, version.encoding, len(entries),
                               tuple(summarize(changes)), changes,
                               alphas if ww is not None else None,
                               summarize_alpha(alphas) if ww is not None else None))
    return out


def analyze_plot(analyses: Sequence[RefAnalysis], path: str | os.PathLike, *, value: str = "rel_change") -> Path:
    """The heatmap of ``analysis.heatmap``: one panel per ref, one colour scale."""
    from .analysis import heatmap

    panels: dict[str, Mapping[str, TensorChange]] = {}
    for a in analyses:
        label = f"{a.ref} ({a.encoding})"
        if label in panels:
            label = f"{a.ref} ({a.encoding}, {a.version_id[3:11]})"
        panels[label] = a.changes
    return heatmap(panels, path, value=value, title=f"relative change ||dW||/||W|| per layer and module")


@dataclass(frozen=True)
class Spectra:
    """The singular values, descending, of one 2-D tensor of the base, of what a version applies,
    and of their difference."""

    ref: str
    name: str
    base: tuple[float, ...]
    tuned: tuple[float, ...]
    delta: tuple[float, ...]


def spectra(store: Any, refs: Sequence[str], name: str, *, base_weights: Any = None) -> list[Spectra]:
    """``Spectra`` of tensor ``name`` for each ref (the seeds' "can we see what shifted?")."""
    out = []
    for ref in refs:
        version = store.resolve(ref)
        source = store.base_source(store.base(version.base_id), base_weights)
        infos, tensor = store.materialize(version, base_weights=source)
        if name not in infos:
            close = [n for n in infos if name in n][:3]
            raise CompareError(f"{version.ref} has no tensor {name!r}" + (f"; did you mean {', '.join(close)}?"
                                                                          if close else ""))
        b, t = source.get(name), tensor(name)
        if b.dim() != 2 or t.shape != b.shape or not b.is_floating_point():
            raise CompareError(f"{name} is not a floating-point matrix of one shape in base and {version.ref}: "
                               "it has no spectrum")
        b32, t32 = b.to(torch.float32), t.to(torch.float32)
        out.append(Spectra(version.ref, name, tuple(singular_values(b32).tolist()),
                           tuple(singular_values(t32).tolist()), tuple(singular_values(t32 - b32).tolist())))
    return out


def spectrum_plot(spectra_: Sequence[Spectra], path: str | os.PathLike) -> Path:
    """Two panels: the spectra of the base and of each ref's tensor (left), of each delta (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    first = spectra_[0]
    left.plot(range(1, len(first.base) + 1), first.base, color="black", linewidth=2.2, label="base")
    for s in spectra_:
        left.plot(range(1, len(s.tuned) + 1), s.tuned, linewidth=1, linestyle="--", label=s.ref)
        right.plot(range(1, len(s.delta) + 1), [max(v, 1e-30) for v in s.delta], linewidth=1.2, label=s.ref)
    for ax, title in ((left, "weights W (base) and W + dW"), (right, "delta dW")):
        ax.set_yscale("log")
        ax.set_xlabel("index i")
        ax.set_ylabel("singular value")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=8)
    fig.suptitle(f"singular values of {first.name}", fontsize=11)
    out = Path(path)
    fig.savefig(out, format="png", dpi=120)
    return out


# ---------------------------------------------------------------------------------------------
# The picture

_KIND_STYLE = {
    "full": ("#4d4d4d", "s", "full copy"),
    "full-quantized": ("#9467bd", "D", "full model quantised"),
    "delta": ("#1f77b4", "o", "delta encoding"),
    "lora": ("#d62728", "^", "LoRA (rank R)"),
    "selection": ("#2ca02c", "v", "selection"),
}


def _overlap(a: Any, b: Any) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


def plot(comparison: Comparison, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Size against KL(fine-tuned || stored), both on log scales, one labelled point per row;
    rows whose KL is 0 sit on a line marked 0 under the rest, the base's own KL is a dashed
    line. PNG."""
    rows = [r for r in comparison.rows if r.kind != "base"]
    base_row = next((r for r in comparison.rows if r.kind == "base"), None)
    if any(r.kl is None for r in comparison.rows):
        raise CompareError(f"the plot needs fidelity, which was not measured ({comparison.fidelity_skipped}); "
                           "give --prompts FILE and the base as a Hugging Face model folder")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter
    from matplotlib.transforms import Bbox

    positive = [r.kl for r in comparison.rows if r.kl and r.kl > 0]
    low = min(positive) if positive else 1e-6
    high = max(positive) if positive else 1.0
    floor = 10 ** (math.floor(math.log10(low)) - 1)

    fig = Figure(figsize=(10.5, 6.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    xs = [max(r.bytes, 1) for r in rows]
    ys = [r.kl if r.kl > 0 else floor for r in rows]
    for kind, (color, marker, label) in _KIND_STYLE.items():
        pts = [(x, y) for x, y, r in zip(xs, ys, rows) if r.kind == kind]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=color, marker=marker, s=46, label=label,
                       zorder=3, edgecolors="white", linewidths=0.6)
    if base_row is not None and base_row.kl:
        ax.axhline(base_row.kl, color="#ff7f0e", linestyle="--", linewidth=1.2, zorder=1,
                   label=f"base model, nothing kept (KL {base_row.kl:.3g})")
    ax.axhline(floor, color="#bbbbbb", linewidth=0.8, zorder=0)
    ax.set_xlim(min(xs) / 4, max(xs) * 12)  # room for the labels right of the largest
    ax.set_ylim(floor / 4, max(high, base_row.kl if base_row and base_row.kl else high) * 6)
    # A log axis cannot show 0: the floor line stands for it.
    decades = range(int(math.log10(floor)) + 1, int(math.ceil(math.log10(ax.get_ylim()[1]))) + 1)
    ticks = [floor] + [10.0 ** d for d in decades]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.set_yticklabels(["0 (exact)"] + [f"1e{d}" for d in decades])
    ax.yaxis.set_minor_locator(LogLocator(subs="auto"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("bytes stored (log scale)")
    ax.set_ylabel("KL(fine-tuned || stored), nats per token (log scale)")
    ax.grid(True, which="major", alpha=0.25)
    ax.set_title(title or f"What each way of storing the fine-tune costs and keeps "
                          f"({comparison.positions} positions)", fontsize=11)
    # The lower left is where no way of storing a fine-tune lands (small and exact).
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    taken = [ax.get_legend().get_window_extent(renderer)]
    points = ax.transData.transform(list(zip(xs, ys)))
    for px, py in points:
        taken.append(Bbox([[px - 8, py - 8], [px + 8, py + 8]]))
    frame = ax.get_window_extent(renderer)
    # Labels keep off the base's dashed line and the line that stands for 0.
    for level in ([base_row.kl] if base_row is not None and base_row.kl else []) + [floor]:
        y = ax.transData.transform((xs[0], level))[1]
        taken.append(Bbox([[frame.x0, y - 2], [frame.x1, y + 2]]))
    offsets = [(dx, dy) for radius in (7, 16, 28, 42, 58, 76)
               for dx, dy in ((radius, 0), (radius, -radius), (radius, radius), (0, radius), (0, -radius),
                              (-radius, 0), (-radius, radius), (-radius, -radius))]
    order = sorted(range(len(rows)), key=lambda i: (points[i][0], points[i][1]))
    for i in order:
        row = rows[i]
        text = f"{_short(row.label)}  {_size(row.bytes)}"
        best, best_cost = None, math.inf
        for dx, dy in offsets:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
            candidate = ax.annotate(text, (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset pixels",
                                    ha=ha, va=va, fontsize=8)
            box = candidate.get_window_extent(renderer).expanded(1.04, 1.15)
            cost = sum(_overlap(box, other) for other in taken)
            outside = (max(frame.x0 - box.x0, 0) + max(box.x1 - frame.x1, 0)
                       + max(frame.y0 - box.y0, 0) + max(box.y1 - frame.y1, 0))
            cost += outside * 1000 + math.hypot(dx, dy) * 0.01
            candidate.remove()
            if cost < best_cost:
                best, best_cost = (dx, dy, ha, va, box), cost
            if cost < 1:
                break
        dx, dy, ha, va, box = best
        # A label away from its point gets a line to it, so that it cannot be read as a neighbour's.
        arrow = dict(arrowstyle="-", color="#888888", lw=0.6) if math.hypot(dx, dy) > 12 else None
        ax.annotate(text, (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset pixels", ha=ha, va=va,
                    fontsize=8, arrowprops=arrow, zorder=4)
        taken.append(box)
    out = Path(path)
    fig.savefig(out, format="png", dpi=130)
    return out


def _short(label: str) -> str:
    return label if len(label) <= 38 else label[:35] + "..."
