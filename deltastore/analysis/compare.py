"""What each way of storing a fine-tune costs, and how much of its behaviour it keeps.

``compare``: one row per way of storing a fine-tune (nothing, the full copy, the full model
quantised, every delta encoding, a LoRA of each rank, any selection) with its bytes and, where
the base is a Hugging Face folder and prompts are given, its fidelity. The arithmetic is in
analysis.py, the next-token KL in fidelity.py, the picture in plots.py; ``commit --encoding
auto`` (auto.py) measures its candidates on the same ``Bench``.

Bytes are those the store would write: each tensor is encoded and each part compressed as
objects.py compresses it (header included), without writing anything. It works tensor by
tensor: ONE model is loaded, each row's reconstructed tensors are copied into it in place, the
``FidelityProbe`` measures whatever weights it holds, and the fine-tune is put back only where
the next row does not set the tensor itself. Peak memory is that model plus a few tensors in
flight. It never writes to a store, never prints and never loads a pickle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..codecs import encodings as codecs
from ..codecs import quantize as Q
from ..patching.apply import match_names, module_tensors
from ..metrics.analysis import energy_fraction, lora_bytes, singular_values
from ..engine.commit import spec_chooser, delta_stats
from ..core.pools import in_order
from ..core.errors import CompareError
from ..metrics.fidelity import Fidelity, FidelityProbe, load_causal_lm, read_prompts
from ..exports.lora import module_types, plan as lora_plan
from ..patching.mix import mixed, resolve_weights
from ..weights.models import TensorSource, open_model
from ..repo.objects import stored_size
from ..codecs.selection import Selection, Selector, TensorDelta, select
from ..core.units import size

if TYPE_CHECKING:
    from ..store import Store

__all__ = [
    "Bench",
    "CompareError",
    "Comparison",
    "DEFAULT_ENCODINGS",
    "DEFAULT_RANKS",
    "FULL_QUANTIZED",
    "Row",
    "Select",
    "compare",
    "parse_select",
]

DEFAULT_ENCODINGS: tuple[str, ...] = ("lossless", "int8", "int4", "nf4", "fp4", "1bit")
DEFAULT_RANKS: tuple[int, ...] = (8, 32)
#: The full model itself quantised (the "quantized full model" a user might keep instead).
FULL_QUANTIZED: tuple[str, ...] = ("int4", "nf4")
SELECT_KEYS = ("include", "exclude", "top_k", "min_rel_change", "energy", "encoding")


# ---------------------------------------------------------------------------------------------
# What the user asks for


@dataclass(frozen=True)
class Select:
    """A user's selection, as ``--select`` spells it: ``KEY=VALUE`` pairs joined by ``;``, keys
    ``include``, ``exclude`` (regexes), ``top_k``, ``min_rel_change``, ``energy`` (numbers) and
    ``encoding`` (of the tensors kept; lossless by default)."""

    text: str
    selector: Selector = Selector()
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
    encoding = values.pop("encoding", "lossless")
    codecs.get(encoding)
    return Select(text, Selector(**values), encoding)


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
class Scan:
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


def lowrank_rank(spec: str, options: Mapping[str, Any]) -> int:
    """The rank of a ``lowrank:R`` spec; 0 for any other."""
    return getattr(codecs.get(spec, **options), "rank", None) or 0


def select_changed(scans: Mapping[str, Scan], selector: Selector) -> Selection:
    """What ``selector`` keeps of the tensors the scan found changed, ranked as commit ranks them."""
    return select({n: TensorDelta.of(s.rel_change, s.energy) for n, s in scans.items() if s.changed}, selector)


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


# ---------------------------------------------------------------------------------------------
# Rows


def delta_work(bench: Bench, scans: Mapping[str, Scan], spec: str, options: Mapping[str, Any],
                kept: set[str] | None = None, rules: Sequence[tuple[str, str]] | None = None) -> Work:
    # The very choice commit makes, tensor by tensor (norms lossless, ranks checked, rules).
    choose = spec_chooser(spec, list(rules or []), dict(options), bench.target)

    def work(name: str):
        if not scans[name].changed:
            return 0, False, None
        if kept is not None and name not in kept:
            return 0, False, bench.base.get(name)
        b, t = bench.base.get(name), bench.target.get(name)
        enc = choose(name, b, t)
        encoded = bench.encode(enc, name, b, t)
        value = None
        if bench.measuring and not enc.exact:
            value = enc.decode(b, encoded, dtype=t.dtype, shape=tuple(t.shape))
        return _parts_size(encoded), True, value
    return work


def _full_quantized_work(bench: Bench, spec: str) -> Work:
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


def _lora_work(bench: Bench, scans: Mapping[str, Scan], the_plan: Any, rank: int, dtype: str) -> Work:
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
                value = enc.decode(b, bench.encode(enc, name, b, t), dtype=t.dtype, shape=tuple(t.shape))
            return lora_bytes(shape, r, itemsize), True, value
        if name in the_plan.saved:
            return 0, True, None  # counted whole, below
        return 0, False, bench.base.get(name)
    return work


def mix_label(weights: Mapping[str, float]) -> str:
    """``curious=0.5,confident=0.5``: as ``--mix`` spells it."""
    return ",".join(f"{ref}={weight:g}" for ref, weight in weights.items())


def _mix_work(bench: Bench, scans: Mapping[str, Scan], store: Store, weights: Mapping[str, float]) -> Work:
    # mix.py's own arithmetic on compare's base weights (checked against the versions' base);
    # the bytes are those of the versions' objects as the store holds them, each counted once.
    _, tensor = mixed(store, weights, base_weights=bench.base)
    versions = resolve_weights(store, weights)
    entries: dict[str, list[Any]] = {}
    for version, _ in versions:
        for entry in version.tensors:
            entries.setdefault(entry.name, []).append(entry)
    counted: set[str] = set()

    def work(name: str):
        nbytes = 0
        for entry in entries.get(name, ()):
            for o in entry.objects.values():
                if o.id not in counted:
                    counted.add(o.id)
                    nbytes += store.objects.size(o.id)
        if name not in entries and not scans[name].changed:
            return 0, False, None
        return nbytes, name in entries, tensor(name) if bench.measuring else None
    return work


def _against_work(bench: Bench, scans: Mapping[str, Scan], store: Store, version: Any, spec: str,
                  options: Mapping[str, Any]) -> Work:
    # As commit --against takes each delta: against the version's result (verified), for every
    # tensor that differs from the base or that the version stores.
    _, reference = store.materialize(version, base_weights=bench.base)
    listed = {e.name for e in version.tensors}
    choose = spec_chooser(spec, [], dict(options), bench.target)

    def work(name: str):
        if not scans[name].changed and name not in listed:
            return 0, False, None
        r, t = reference(name), bench.target.get(name)
        enc = choose(name, r, t)
        encoded = enc.encode(r, t)
        value = None
        if bench.measuring and not enc.exact:
            value = enc.decode(r, encoded, dtype=t.dtype, shape=tuple(t.shape))
        return _parts_size(encoded), True, value
    return work


def _fid(fidelity: Fidelity | None) -> dict[str, float | None]:
    return {"kl": fidelity.kl if fidelity else None, "top1": fidelity.top1 if fidelity else None}


def compare(base: Any, model: Any, *, encodings: Sequence[str] = DEFAULT_ENCODINGS,
            ranks: Sequence[int] = DEFAULT_RANKS, selections: Sequence[str | Select] = (),
            prompts: Sequence[str] | str | os.PathLike | None = None,
            full: Sequence[str] = FULL_QUANTIZED, lora_dtype: str = "bf16",
            encoding_options: Mapping[str, Any] | None = None, max_tokens: int = 256, chat: bool = False,
            tokenizer: str | os.PathLike | None = None, store: Store | None = None,
            mixes: Sequence[Mapping[str, float]] = (), against: Sequence[str] = (),
            progress: Callable[[int, int], None] | None = None) -> Comparison:
    """Every way of storing fine-tune ``model`` of ``base``, with its bytes and fidelity.

    ``base``/``model``: a .safetensors file, a model folder, a state dict or a module. Fidelity
    is measured when ``prompts`` (a list, or a file with one per line) are given; the base must
    then be a Hugging Face model folder; with ``chat`` each prompt is a user message put through
    the tokenizer's chat template. ``encodings``: delta encodings (any spec, lowrank:R
    included); ``ranks``: LoRA ranks; ``selections``: ``Select`` or its ``--select`` text;
    ``full``: encodings for the whole model quantised; ``lora_dtype``: of the LoRA factors;
    ``tokenizer``: a folder or tokenizer.json, where the base folder has no tokenizer.
    ``mixes``: stored versions of ``store`` at a strength, or mixed (``{ref: a, ref: b}``), each
    a row: ``base + a*dW1 + b*dW2`` measured like the rest, its bytes those its versions hold.
    ``against``: refs of ``store``; for each, one row per delta encoding of what ``commit
    --against REF`` would store (each tensor's delta against that version's result).
    """
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
    if (mixes or against) and store is None:
        raise CompareError("mix and against rows measure stored versions: give the store they are in")
    for weights in mixes:
        resolve_weights(store, weights)  # every ref and weight checked before any work
    references = [store.resolve(ref) for ref in against]
    rows_asked = 2 + len(full) + len(specs) + len(ranks) + len(chosen) + len(mixes) + len(references) * len(specs)
    base_src, target_src, scans, bench, skipped = open_bench(
        base, model, prompts, max_tokens, spectra=bool(ranks), progress=progress, rows=rows_asked, chat=chat,
        tokenizer=tokenizer)
    asked = [*specs, *(sel.encoding for sel in chosen)]
    bench.basis_rank = max([0, *ranks, *(lowrank_rank(s, options) for s in asked)])
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
        nbytes, stored, fidelity = bench.run(delta_work(bench, scans, spec, options), measure=not enc.exact)
        add(f"delta {enc.spec}", "delta", enc.spec, nbytes, stored, fidelity, exact=enc.exact and measuring)
    if ranks:
        the_plan = lora_plan(target_src.infos, changed, types=module_types(base_src.folder))
        whole = sum(target_src.infos[n].nbytes for n in the_plan.saved)
        note = []
        if the_plan.saved:
            note.append(f"{len(the_plan.saved)} tensors whole ({size(whole)})")
        if the_plan.dropped:
            note.append(f"{len(the_plan.dropped)} dropped (base)")
        for rank in ranks:
            nbytes, stored, fidelity = bench.run(_lora_work(bench, scans, the_plan, rank, lora_dtype))
            spectra = [scans[f"{m}.weight"].spectrum for m in the_plan.targets]
            held = [energy_fraction(s, min(rank, min(the_plan.targets[m][1])))
                    for m, s in zip(the_plan.targets, spectra) if s is not None]
            add(f"LoRA r={rank}", "lora", f"lowrank:{rank}", nbytes + whole, stored, fidelity,
                energy=sum(held) / len(held) if held else None, note=", ".join(note))
    if chosen:
        for sel in chosen:
            picked = select_changed(scans, sel.selector)
            nbytes, stored, fidelity = bench.run(
                delta_work(bench, scans, sel.encoding, options, kept=set(picked.kept)))
            add(f"select {sel.text}", "selection", sel.encoding, nbytes, stored, fidelity,
                energy=1.0 - picked.left_out_energy_fraction,
                note=f"{len(picked.kept)} of {len(changed)} changed tensors")
    for weights in mixes:
        nbytes, stored, fidelity = bench.run(_mix_work(bench, scans, store, weights))
        add(f"mix {mix_label(weights)}", "mix", None, nbytes, stored, fidelity,
            note="base + a*delta of each version, rounded once")
    for version in references:
        for spec in specs:
            enc = codecs.get(spec, **options)
            nbytes, stored, fidelity = bench.run(_against_work(bench, scans, store, version, spec, options),
                                                 measure=not enc.exact)
            add(f"against {version.ref}, {enc.spec}", "against", enc.spec, nbytes, stored, fidelity,
                exact=enc.exact and measuring, note=f"what commit --against {version.ref} stores")
    return Comparison(
        base=str(base_src.path) if base_src.path else "(in memory)",
        model=str(target_src.path) if target_src.path else "(in memory)",
        tensors=len(target_src.names), changed=len(changed), full_bytes=full_bytes, dtype=dtype,
        prompts=bench.prompts,
        positions=bench.probe.positions if bench.probe else 0,
        fidelity_skipped=skipped, rows=tuple(rows))


def _main_dtype(source: TensorSource) -> str:
    by_dtype: dict[str, int] = {}
    for info in source.infos.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    name = max(by_dtype, key=by_dtype.get) if by_dtype else "F32"
    return {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64"}.get(name, name.lower())
