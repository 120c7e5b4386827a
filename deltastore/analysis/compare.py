"""What each way of storing a fine-tune costs, and how much of its behaviour it keeps.

``compare``: one row per way of storing a fine-tune (nothing, the full copy, the full model
quantised, every delta encoding, a LoRA of each rank, any selection) with its bytes and, where
the base is a Hugging Face folder and prompts are given, its fidelity. The arithmetic is in
analysis.py, the next-token KL in fidelity.py, the picture in plots.py; each row is measured on
bench.py's ``Bench`` (ONE model loaded, each row's tensors copied into it in place), on which
``commit --encoding auto`` (auto.py) measures its candidates too.

Bytes are those the store would write: each tensor is encoded and each part compressed as
objects.py compresses it (header included), without writing anything. It never writes to a
store, never prints and never loads a pickle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..codecs import encodings as codecs
from ..metrics.analysis import energy_fraction, lora_bytes
from ..engine.commit import spec_chooser
from ..core.errors import CompareError
from ..metrics.fidelity import Fidelity
from ..exports.lora_plan import module_types, plan as lora_plan
from ..patching.mix import mixed, resolve_weights
from ..weights.models import TensorSource
from ..repo.objects import stored_size
from ..codecs.selection import Selection, Selector, TensorDelta, select
from ..core.units import size
from .bench import Bench, Scan, Work, open_bench, raw_bytes

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

    @property
    def frontier(self) -> tuple[Row, ...]:
        """The rows no other row beats (fewer bytes and no more KL, or no more bytes and less
        KL), fewest bytes first: the best any byte budget can buy. Empty without fidelity."""
        return pareto(self.rows)


def pareto(rows: Sequence[Row]) -> tuple[Row, ...]:
    """The Pareto frontier of `rows` in (bytes, KL), fewest bytes first: each row on it has
    less KL than every row of fewer or equal bytes. Rows without a KL or with no bytes (the
    base, which keeps nothing) are not on it."""
    frontier: list[Row] = []
    for row in sorted((r for r in rows if r.kl is not None and r.bytes > 0), key=lambda r: (r.bytes, r.kl)):
        if not frontier or row.kl < frontier[-1].kl:
            frontier.append(row)
    return tuple(frontier)


def _parts_size(encoded: codecs.Encoded) -> int:
    # As version.bytes counts them: every part an object of its own, shared ones in full.
    return sum(stored_size(part) for part in encoded.parts.values())


def lowrank_rank(spec: str, options: Mapping[str, Any]) -> int:
    """The rank of a ``lowrank:R`` spec; 0 for any other."""
    return getattr(codecs.get(spec, **options), "rank", None) or 0


def select_changed(scans: Mapping[str, Scan], selector: Selector) -> Selection:
    """What ``selector`` keeps of the tensors the scan found changed, ranked as commit ranks them."""
    return select({n: TensorDelta.of(s.rel_change, s.energy) for n, s in scans.items() if s.changed}, selector)


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
            return stored_size(raw_bytes(t)), True, None
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
    _, tensor = mixed(store.reader, weights, base_weights=bench.base)
    versions = resolve_weights(store.reader, weights)
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
    specs, ranks, chosen, references = _checked(encodings, ranks, selections, full, lora_dtype, options, store,
                                                mixes, against)
    rows_asked = 2 + len(full) + len(specs) + len(ranks) + len(chosen) + len(mixes) + len(references) * len(specs)
    base_src, target_src, scans, bench, skipped = open_bench(
        base, model, prompts, max_tokens, spectra=bool(ranks), progress=progress, rows=rows_asked, chat=chat,
        tokenizer=tokenizer)
    asked = [*specs, *(sel.encoding for sel in chosen)]
    bench.basis_rank = max([0, *ranks, *(lowrank_rank(s, options) for s in asked)])
    changed = [n for n in target_src.names if scans[n].changed]
    rows = _Rows(bench.measuring, target_src.nbytes)
    dtype = _main_dtype(target_src)
    _whole_rows(rows, bench, scans, changed, dtype, full)
    for spec in specs:
        enc = codecs.get(spec, **options)
        nbytes, stored, fidelity = bench.run(delta_work(bench, scans, spec, options), measure=not enc.exact)
        rows.add(f"delta {enc.spec}", "delta", enc.spec, nbytes, stored, fidelity, exact=enc.exact and rows.measuring)
    if ranks:
        _lora_rows(rows, bench, scans, base_src, changed, ranks, lora_dtype)
    for sel in chosen:
        picked = select_changed(scans, sel.selector)
        nbytes, stored, fidelity = bench.run(delta_work(bench, scans, sel.encoding, options, kept=set(picked.kept)))
        rows.add(f"select {sel.text}", "selection", sel.encoding, nbytes, stored, fidelity,
                 energy=1.0 - picked.left_out_energy_fraction, note=f"{len(picked.kept)} of {len(changed)} changed tensors")
    for weights in mixes:
        nbytes, stored, fidelity = bench.run(_mix_work(bench, scans, store, weights))
        rows.add(f"mix {mix_label(weights)}", "mix", None, nbytes, stored, fidelity,
                 note="base + a*delta of each version, rounded once")
    for version in references:
        _against_rows(rows, bench, scans, store, version, specs, options)
    return Comparison(
        base=str(base_src.path) if base_src.path else "(in memory)",
        model=str(target_src.path) if target_src.path else "(in memory)",
        tensors=len(target_src.names), changed=len(changed), full_bytes=rows.full_bytes, dtype=dtype,
        prompts=bench.prompts,
        positions=bench.probe.positions if bench.probe else 0,
        fidelity_skipped=skipped, rows=tuple(rows.rows))


def _checked(encodings: Sequence[str], ranks: Sequence[int], selections: Sequence[str | Select],
             full: Sequence[str], lora_dtype: str, options: Mapping[str, Any], store: Store | None,
             mixes: Sequence[Mapping[str, float]], against: Sequence[str]) -> tuple[list[str], list[int], list[Select], list[Any]]:
    """(encodings, ranks, selections, versions compared against) of what ``compare`` is asked,
    every one checked before any work."""
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
        resolve_weights(store.reader, weights)
    return specs, ranks, chosen, [store.resolve(ref) for ref in against]


@dataclass
class _Rows:
    """The rows as they are measured. ``exact`` rows keep everything: where fidelity is measured,
    their KL is 0 and their top-1 1 without a run."""

    measuring: bool
    full_bytes: int
    rows: list[Row] = field(default_factory=list)

    def add(self, label: str, kind: str, spec: str | None, nbytes: int, tensors: int,
            fidelity: Fidelity | None, energy: float | None = None, note: str = "", exact: bool = False) -> None:
        kl, top1 = (0.0, 1.0) if (exact and self.measuring) else (_fid(fidelity)["kl"], _fid(fidelity)["top1"])
        self.rows.append(Row(label, kind, spec, nbytes, nbytes / self.full_bytes if self.full_bytes else 0.0,
                             tensors, energy, kl, top1, note))


def _whole_rows(rows: _Rows, bench: Bench, scans: Mapping[str, Scan], changed: Sequence[str], dtype: str,
                full: Sequence[str]) -> None:
    """The rows that keep no delta: the base alone (the reference point), the full copy, raw and
    compressed, and the full model quantised as each of ``full``."""
    _, _, fidelity = bench.run(lambda n: (0, False, bench.base.get(n) if scans[n].changed else None))
    rows.add("base (nothing kept)", "base", None, 0, 0, fidelity, note=f"{len(changed)} tensors differ from the fine-tune")
    rows.add(f"full copy ({dtype})", "full", None, rows.full_bytes, len(bench.target.names), None, exact=True)
    nbytes, stored, _ = bench.run(lambda n: (stored_size(raw_bytes(bench.target.get(n))), True, None), measure=False)
    rows.add("full copy, zstd", "full", "zstd", nbytes, stored, None, exact=True)
    for spec in full:
        nbytes, stored, fidelity = bench.run(_full_quantized_work(bench, spec))
        rows.add(f"full model {spec}", "full-quantized", spec, nbytes, stored, fidelity,
                 note="2-D tensors quantised, others kept")


def _lora_rows(rows: _Rows, bench: Bench, scans: Mapping[str, Scan], base_src: TensorSource, changed: Sequence[str],
               ranks: Sequence[int], lora_dtype: str) -> None:
    """A LoRA of each rank, planned as export-lora plans it: its pairs, and the tensors it keeps whole."""
    infos = bench.target.infos
    the_plan = lora_plan(infos, changed, types=module_types(base_src.folder))
    whole = sum(infos[n].nbytes for n in the_plan.saved)
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
        rows.add(f"LoRA r={rank}", "lora", f"lowrank:{rank}", nbytes + whole, stored, fidelity,
                 energy=sum(held) / len(held) if held else None, note=", ".join(note))


def _against_rows(rows: _Rows, bench: Bench, scans: Mapping[str, Scan], store: Store, version: Any,
                  specs: Sequence[str], options: Mapping[str, Any]) -> None:
    """One row per delta encoding of what ``commit --against`` ``version`` would store."""
    for spec in specs:
        enc = codecs.get(spec, **options)
        nbytes, stored, fidelity = bench.run(_against_work(bench, scans, store, version, spec, options),
                                             measure=not enc.exact)
        rows.add(f"against {version.ref}, {enc.spec}", "against", enc.spec, nbytes, stored, fidelity,
                 exact=enc.exact and rows.measuring, note=f"what commit --against {version.ref} stores")


def _main_dtype(source: TensorSource) -> str:
    by_dtype: dict[str, int] = {}
    for info in source.infos.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    name = max(by_dtype, key=by_dtype.get) if by_dtype else "F32"
    return {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64"}.get(name, name.lower())
