"""``commit --encoding auto --max-kl K``: the smallest encoding that keeps a fine-tune's behaviour.

``choose_encoding`` sizes every candidate as compare.py's ``Bench`` does (encoded and
compressed, nothing written), then measures the fidelity of the candidates smallest first and
stops at the first whose KL(fine-tuned || stored) is at most K. ``commit_measured`` commits
the choice through ``Store.commit`` with the figures in the version's metadata. It never prints
and never writes but through ``Store.commit``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..codecs import encodings as codecs
from .compare import Row, Work, delta_work, lowrank_rank, open_bench, select_changed
from ..engine.commit import check_names, holds_what
from ..core.errors import CompareError, EncodingError, IdenticalVersion
from ..core.hashing import bytes_id, canonical_json
from ..metrics.fidelity import Fidelity
from ..weights.models import open_model
from ..codecs.selection import Selector
from ..core.units import size

if TYPE_CHECKING:
    from ..repo.records import CommitResult
    from ..store import Store

__all__ = ["AUTO_CALIBRATED", "AUTO_CANDIDATES", "AutoChoice", "MeasuredCommit", "choose_encoding", "commit_measured"]

#: What ``commit --encoding auto`` chooses from; ranks a matrix cannot hold are skipped.
_PLAIN = ("lossless", "int8", "int4", "nf4", "fp4", "1bit", "lowrank:8", "lowrank:32", "lowrank:128")
AUTO_CANDIDATES: tuple[str, ...] = _PLAIN + ("mixedrank:8", "mixedrank:16", "mixedrank:24", "mixedrank:32",
                                             "mixedrank:48", "mixedrank:64")
#: With calibration prompts: mixedrank fitted to the activations, which keeps several times more
#: than plain mixedrank in the same small bytes (docs/fidelity.md) but gains little past :32,
#: in place of the smaller plain ones.
AUTO_CALIBRATED: tuple[str, ...] = _PLAIN + ("mixedrank-aw:4", "mixedrank-aw:8", "mixedrank-aw:12",
                                             "mixedrank-aw:16", "mixedrank-aw:24", "mixedrank-aw:32",
                                             "mixedrank:48", "mixedrank:64")


@dataclass(frozen=True)
class AutoChoice:
    """The encoding chosen (the smallest whose KL is at most ``max_kl``, or the one of lowest KL
    within ``max_bytes``; or the one asked for), its measured fidelity and bytes, the base's own
    KL, and every candidate measured."""

    encoding: str
    kl: float
    top1: float
    bytes: int
    max_kl: float | None
    base_kl: float
    positions: int
    candidates: tuple[Row, ...]
    max_bytes: int | None = None


def choose_encoding(base: Any, model: Any, *, prompts: Sequence[str] | str | os.PathLike,
                    max_kl: float | None, candidates: Sequence[str] = AUTO_CANDIDATES,
                    selector: Selector | None = None, encoding_for: Sequence[tuple[str, str]] | None = None,
                    encoding_options: Mapping[str, Any] | None = None, max_tokens: int = 256,
                    chat: bool = False, tokenizer: str | os.PathLike | None = None,
                    progress: Callable[[int, int], None] | None = None, max_bytes: int | None = None) -> AutoChoice:
    """Measure each candidate encoding (under the selection given) and pick, among those of at
    most ``max_bytes`` (any, when None), the smallest by bytes whose KL(fine-tuned || stored) is
    at most ``max_kl``, ties going to the lower KL; with ``max_kl`` None, the one of lowest KL.
    With neither bound, ``candidates`` must be one encoding, which is measured."""
    if max_kl is not None and (not isinstance(max_kl, (int, float)) or not math.isfinite(max_kl) or max_kl < 0):
        raise CompareError(f"--max-kl must be a number of at least 0 (nats per token), got {max_kl!r}")
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1):
        raise CompareError(f"--max-bytes must be a whole number of bytes, at least 1, got {max_bytes!r}")
    if max_kl is None and max_bytes is None and len(candidates) != 1:
        raise CompareError("choosing an encoding needs --max-kl K (the largest KL(fine-tuned || stored) to accept) "
                           "or --max-bytes B")
    options = dict(encoding_options or {})
    base_src, target_src, scans, bench, skipped = open_bench(
        base, model, prompts, max_tokens, spectra=False, progress=progress, rows=len(candidates) + 1, chat=chat,
        tokenizer=tokenizer)
    if bench.probe is None:
        raise CompareError(f"cannot measure fidelity: {skipped}")
    bench.basis_rank = max([0, *(lowrank_rank(s, options) for s in candidates if _known(s, options))])
    kept = set(select_changed(scans, selector).kept) if selector else None
    _, _, base_fid = bench.run(lambda n: (0, False, bench.base.get(n) if scans[n].changed else None))
    # Pass 1: every candidate's bytes, without reconstructing anything (encoding is the cheap
    # half). Pass 2: fidelity, a forward pass over the prompts per candidate, the dear half:
    # smallest first until one fits --max-kl (those larger need none).
    works: dict[str, Work] = {}
    sized: dict[str, tuple[int, int]] = {}
    skipped: dict[str, str] = {}
    for spec in candidates:
        try:
            works[spec] = delta_work(bench, scans, spec, options, kept=kept, rules=encoding_for)
        except EncodingError as e:
            if len(candidates) == 1:
                raise
            skipped[spec] = f"skipped: {e}"
            continue
        nbytes, stored, _ = bench.run(works[spec], measure=False)
        sized[spec] = (nbytes, stored)

    def measure(spec: str) -> Fidelity:
        if codecs.get(spec, **options).exact:
            return Fidelity(0.0, 1.0, bench.probe.positions)  # bit for bit the fine-tune
        return bench.run(works[spec])[2]

    measured, pick = _pick(candidates, sized, measure, max_kl, max_bytes)
    rows = _rows(candidates, sized, skipped, measured, pick, max_kl, max_bytes, target_src.nbytes)
    if pick is None:
        _refuse(candidates, sized, skipped, measured, max_kl, max_bytes)
    chosen = measured[pick]
    return AutoChoice(pick, chosen.kl, chosen.top1, sized[pick][0], max_kl, base_fid.kl,
                      bench.probe.positions, tuple(rows), max_bytes)


def _pick(candidates: Sequence[str], sized: Mapping[str, tuple[int, int]], measure: Callable[[str], Fidelity],
          max_kl: float | None, max_bytes: int | None) -> tuple[dict[str, Fidelity], str | None]:
    """(the fidelity of each candidate measured, the one chosen or None)."""
    fitting = sorted((s for s in sized if max_bytes is None or sized[s][0] <= max_bytes),
                     key=lambda s: (sized[s][0], candidates.index(s)))
    measured: dict[str, Fidelity] = {}
    for spec in fitting:
        measured[spec] = measure(spec)
        if max_kl is not None and measured[spec].kl <= max_kl:
            return measured, spec
        if max_kl is None and measured[spec].kl == 0.0:
            return measured, spec  # nothing larger can do better
    if max_kl is None and measured:
        return measured, min(measured, key=lambda s: (measured[s].kl, sized[s][0]))
    return measured, None


def _rows(candidates: Sequence[str], sized: Mapping[str, tuple[int, int]], skipped: Mapping[str, str],
          measured: Mapping[str, Fidelity], pick: str | None, max_kl: float | None, max_bytes: int | None,
          full_bytes: int) -> list[Row]:
    """One row per candidate, with a note that says why it was or was not chosen."""
    rows = []
    for spec in candidates:
        if spec in skipped:
            rows.append(Row(f"delta {spec}", "delta", spec, 0, 0.0, 0, note=skipped[spec]))
            continue
        nbytes, stored = sized[spec]
        fidelity = measured.get(spec)
        if max_bytes is not None and nbytes > max_bytes:
            note = f"not measured: {size(nbytes)} is above --max-bytes {size(max_bytes)}"
        elif fidelity is None:
            note = f"not measured: larger than {pick} ({size(nbytes)} against {size(sized[pick][0])})"
        elif spec == pick:
            note = ("chosen: the smallest within --max-kl" if max_kl is not None else
                    "chosen: the lowest KL within --max-bytes" if max_bytes is not None else "measured")
        elif max_kl is not None:
            note = f"rejected: KL {fidelity.kl:.3g} is above --max-kl {max_kl:g}"
        else:
            note = f"rejected: KL {fidelity.kl:.3g} is above {pick}'s"
        rows.append(Row(f"delta {spec}", "delta", spec, nbytes, nbytes / full_bytes if full_bytes else 0.0,
                        stored, None, fidelity.kl if fidelity else None, fidelity.top1 if fidelity else None,
                        note))
    return rows


def _refuse(candidates: Sequence[str], sized: Mapping[str, tuple[int, int]], skipped: Mapping[str, str],
            measured: Mapping[str, Fidelity], max_kl: float | None, max_bytes: int | None) -> None:
    """The one-line reason nothing was chosen."""
    if len(candidates) == 1 and measured:
        only = next(iter(measured))
        raise CompareError(f"{only} gives KL {measured[only].kl:.3g}, more than --max-kl {max_kl:g}; "
                           "nothing was committed: choose a finer encoding, or --encoding auto")
    if not sized:
        raise CompareError("no candidate encoding can store this model: "
                           + "; ".join(f"{s}: {why}" for s, why in skipped.items()))
    if not measured:
        smallest = min(sized, key=lambda s: sized[s][0])
        raise CompareError(f"no encoding fits in --max-bytes {size(max_bytes)}: the smallest is {smallest} "
                           f"({size(sized[smallest][0])}); raise --max-bytes, or keep fewer tensors")
    best = min(measured, key=lambda s: measured[s].kl)
    within = f" within --max-bytes {size(max_bytes)}" if max_bytes is not None else ""
    raise CompareError(f"no encoding{within} keeps KL at most {max_kl:g}: the lowest is {measured[best].kl:.3g} "
                       f"({best}); raise --max-kl{', or --max-bytes' if within else ''}, or keep more tensors")


@dataclass(frozen=True)
class MeasuredCommit:
    result: CommitResult
    choice: AutoChoice


def commit_measured(store: Store, stance: str, model: Any, *, base: Any, prompts: str | os.PathLike | Sequence[str],
                    encoding: str = "auto", max_kl: float | None = None, max_bytes: int | None = None,
                    base_weights: Any = None,
                    selector: Selector | None = None, include: str | None = None, exclude: str | None = None, top_k: int | None = None,
                    min_rel_change: float | None = None, energy: float | None = None,
                    encoding_for: Sequence[tuple[str, str]] | None = None,
                    encoding_options: Mapping[str, Any] | None = None, chat: bool = False,
                    tokenizer: str | os.PathLike | None = None,
                    metadata: Mapping[str, str] | None = None, progress: Callable[[int, int], None] | None = None,
                    **commit_options: Any) -> MeasuredCommit:
    """Commit ``model`` as the next version of ``stance`` with its fidelity measured and recorded
    in the version's metadata (``fidelity.kl``, ``fidelity.top1``, ``fidelity.base_kl``,
    ``fidelity.positions``, ``fidelity.max_kl``, ``fidelity.max_bytes``). ``encoding="auto"`` picks
    first the smallest encoding whose KL is at most ``max_kl``, or, with ``max_bytes`` alone, the
    one of lowest KL within it (``choose_encoding``). The base's weights must be a Hugging Face model folder. ``selector``,
    or its five options one by one, as ``Store.commit`` takes them. Every refusal that needs
    no measuring (a typo'd stance, another base, a model identical to the newest version, ...)
    comes before the measuring."""
    if encoding == "auto" and max_kl is None and max_bytes is None:
        raise CompareError("--encoding auto needs --max-kl K (the largest KL(fine-tuned || stored) to accept, "
                           "e.g. --max-kl 0.01) or --max-bytes B")
    if max_bytes is not None and encoding != "auto":
        raise CompareError("--max-bytes chooses an encoding: give it with --encoding auto")
    selector = Selector.of(selector, include=include, exclude=exclude, top_k=top_k, min_rel_change=min_rel_change,
                           energy=energy)
    request = _Request(encoding, max_kl, max_bytes, Path(prompts).name if isinstance(prompts, (str, os.PathLike)) else None,
                       chat, selector, list(encoding_for or []), dict(encoding_options or {}), prompts_id(prompts))
    _refuse_before_measuring(store, stance, model, base, request, metadata=metadata, **commit_options)
    folder = _base_folder(store, base, base_weights)
    choice = choose_encoding(folder, model, prompts=prompts, max_kl=max_kl, max_bytes=max_bytes,
                             candidates=((AUTO_CALIBRATED if (encoding_options or {}).get("calibration") is not None
                                          else AUTO_CANDIDATES) if encoding == "auto" else (encoding,)),
                             encoding_for=encoding_for, encoding_options=encoding_options, chat=chat,
                             tokenizer=tokenizer, progress=progress, selector=selector)
    meta = {"fidelity.kl": f"{choice.kl:.6g}", "fidelity.top1": f"{choice.top1:.6g}",
            "fidelity.base_kl": f"{choice.base_kl:.6g}", "fidelity.positions": str(choice.positions)}
    if isinstance(prompts, (str, os.PathLike)):
        meta["fidelity.prompts"] = Path(prompts).name
    if request.prompts_id is not None:
        meta["fidelity.prompts_id"] = request.prompts_id
    if chat:
        meta["fidelity.chat"] = "true"
    if max_kl is not None:
        meta["fidelity.max_kl"] = f"{max_kl:g}"
    if max_bytes is not None:
        meta["fidelity.max_bytes"] = str(max_bytes)
    if encoding == "auto":
        meta["fidelity.chosen_from"] = ",".join(r.spec for r in choice.candidates if r.kl is not None)
    meta.update(metadata or {})
    result = store.commit(stance, model, base=base, base_weights=base_weights, encoding=choice.encoding,
                          encoding_for=list(encoding_for or []), encoding_options=encoding_options, metadata=meta,
                          selector=selector, **commit_options)
    return MeasuredCommit(result, choice)


@dataclass(frozen=True)
class _Request:
    """What a measured commit was asked for, as far as it decides what the version stores."""

    encoding: str
    max_kl: float | None
    max_bytes: int | None
    prompts: str | None  # the file's name, as the version's metadata records it
    chat: bool
    selector: Selector
    encoding_for: list[tuple[str, str]]
    encoding_options: dict[str, Any]
    prompts_id: str | None = None  # prompts_id() of the prompts, where they can be read


def prompts_id(prompts: Any) -> str | None:
    """What the version records of the prompts it was measured on, besides a file's name: the
    id of the file's bytes, or of the list's canonical JSON; None for a file that cannot be
    read (refused where it is read)."""
    if isinstance(prompts, (str, os.PathLike)):
        try:
            return bytes_id(Path(prompts).read_bytes())
        except OSError:
            return None
    return bytes_id(canonical_json(list(prompts)))


def _refuse_before_measuring(store: Store, stance: str, model: Any, base: Any, request: _Request, *,
                             metadata: Mapping[str, str] | None, tag: str | None = None, message: str = "",
                             new_stance: bool = False, against: Any = None, allow_empty: bool = False,
                             move_tag: bool = False, **_: Any) -> None:
    """Every refusal of the commit that needs no measuring, made before the measuring (which
    takes minutes on a real model): those of `Store.check_commit`, a base that is not there
    or whose tensors the model does not have, and a model that would store what the stance's
    newest version stores (`IdenticalVersion`)."""
    store.check_commit(stance, tag=tag, metadata=metadata, message=message, selector=request.selector,
                       new_stance=new_stance, against=against, move_tag=move_tag)
    with store.base_for_commit(base) as (record, expected):
        target = open_model(model, mapped=True)
        check_names(store.reader, record, expected, target)
        newest = store.catalog.latest(stance)
        if allow_empty or newest is None or against is not None:
            return
        version = store.resolve(newest["id"])
        spec = _same_request(version, request)
        if spec is not None and holds_what(version, record.id, expected, target, spec, request.encoding_options):
            raise IdenticalVersion(version.ref, version.id)


def _same_request(version: Any, request: _Request) -> str | None:
    """The encoding this request stores `version`'s model in, when that is sure to be the
    encoding `version` was stored in: the same encoding asked for, or `auto` asked with the same
    bound, prompts file and chat as `version`'s (the same measuring picks the same encoding;
    prompts given as a list are not recorded, so not compared); None where it may differ or
    the selection and rules are not the same."""
    if request.selector or version.selection or request.encoding_for or version.against is not None:
        return None
    if request.encoding != "auto":
        return request.encoding
    meta = version.metadata
    if "fidelity.chosen_from" not in meta or request.prompts is None:
        return None
    bounds = (None if request.max_kl is None else f"{request.max_kl:g}",
              None if request.max_bytes is None else str(request.max_bytes))
    same = ((meta.get("fidelity.max_kl"), meta.get("fidelity.max_bytes")) == bounds
            and meta.get("fidelity.prompts") == request.prompts
            # by content where both are known (a file that cannot be read is refused when measured)
            and (request.prompts_id is None or meta.get("fidelity.prompts_id", request.prompts_id) == request.prompts_id)
            and (meta.get("fidelity.chat") == "true") == request.chat)
    return version.encoding if same else None


def _base_folder(store: Store, base: Any, base_weights: Any) -> Any:
    """Where the base's weights are, for loading it with transformers."""
    if base_weights is not None:
        return base_weights
    if isinstance(base, (str, os.PathLike)) and Path(base).exists():
        return base
    if isinstance(base, (str, os.PathLike)) or hasattr(base, "id"):
        return store.base_folder(store.base(base))
    return base


def _known(spec: str, options: Mapping[str, Any]) -> bool:
    try:
        codecs.get(spec, **options)
    except EncodingError:
        return False  # said where the candidate is tried
    return True
