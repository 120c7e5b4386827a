"""How much of a stored version an export keeps: KL and top-1 of exactly what was written.

This module owns ``export-lora --prompts FILE [--max-kl K]``: the base is loaded as a Hugging
Face model (fidelity.load_causal_lm), the version's weights are put into it, and a
``FidelityProbe`` keeps their next-token distributions. Each export is then read back from the
file(s) written (a PEFT folder through lora.adapter_weights, a GGUF LoRA through
gguf_lora.read_gguf_lora), merged into the base's weights in memory (W + B @ A * scaling, dropped
tensors left at the base), and measured against the version. The base alone is measured too:
what exporting nothing would give (DESIGN.md, "Fidelity").

A GGUF file is measured as llama.cpp runs it where llama-cpp-python is installed: the merged
model file itself, a GGUF LoRA on the base written as a GGUF model (gguf_model.export_base_gguf,
f32, so that the KL is the LoRA's and llama.cpp's arithmetic, not the base's rounding), every
position's logits on the probe's own token ids. llama.cpp multiplies in the file's types (a q8_0
file in q8_0), which torch on dequantised weights does not: on SmolLM2 a q8_0 model measured
0.0105 in llama.cpp against 0.0032 in torch. Without llama.cpp, or for a base it cannot be
given (a tokenizer the GGUF writer refuses), the figure is torch's on the file's dequantised
weights, and the result says so (``ExportFidelity.runtime`` and ``runtime_note``).

``--max-kl K`` writes exports of ranks 1, 2, 4, ... up to the rank asked, each into a temporary
place beside ``out``, measures each as above, and keeps the smallest whose KL is at most K (a
binary search: KL is taken to fall as the rank grows). Only that one is moved to ``out``.

It never imports click, prints or exits; it writes nothing but the export (and its temporary
candidates, removed on every way out).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TYPE_CHECKING

import torch

from ..patching.apply import match_names, module_tensors
from ..core.errors import DeltastoreError
from ..repo.records import recorded_number
from ..metrics.fidelity import Fidelity, FidelityProbe, load_causal_lm, read_prompts
from .export_source import changed_tensors
from .gguf_lora import export_gguf_lora, read_gguf_lora
from .gguf_model import GgufExportError, export_base_gguf, export_gguf, read_gguf_model
from .lora import adapter_weights, export_lora
from .vllm_lora import DEFAULT_MAX_RANK, export_vllm_lora

if TYPE_CHECKING:  # Store for types only: nothing here needs store.py loaded
    from ..store import Store

__all__ = ["ExportBench", "ExportFidelity", "KlNotReached", "MeasuredExport", "export_gguf_measured",
           "export_lora_measured", "export_measured", "llama_cpp_log_probs", "rank_ladder"]


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
    #: What ran the export: "llama.cpp" (a GGUF file as written) or "torch" (the weights read
    #: back, dequantised, in the base's Hugging Face model).
    runtime: str = "torch"
    #: Why a GGUF file's figure is torch's estimate rather than llama.cpp's, else None.
    runtime_note: str | None = None


@dataclass(frozen=True)
class MeasuredExport:
    """An export (what the writer returned), its fidelity, and each rank tried with its KL."""

    export: Any
    fidelity: ExportFidelity
    tried: tuple[tuple[int, float], ...]


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
        _, tensor, self.changed = changed_tensors(store, self.version, base, self.source)
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
        return ExportFidelity(fidelity.kl, fidelity.top1, base.kl, base.top1, recorded_number(meta, "fidelity.kl"),
                              recorded_number(meta, "fidelity.top1"), self.prompts, fidelity.positions)


def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot run a GGUF file here, or None where it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama.cpp is not installed (pip install llama-cpp-python)"
    return None


def _context_length(path: Path) -> int | None:
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields.get("general.architecture")
    field = reader.fields.get(f"{arch.contents()}.context_length") if arch is not None else None
    return int(field.contents()) if field is not None else None


def llama_cpp_log_probs(model: str | os.PathLike, token_ids: Sequence[Sequence[int]], *,
                        lora: str | os.PathLike | None = None) -> list[torch.Tensor]:
    """The next-token log-probabilities llama.cpp gives at every position of each prompt: the GGUF
    model ``model``, with the GGUF LoRA ``lora`` on it, on the CPU with an f32 KV cache."""
    import numpy as np
    from llama_cpp import Llama

    longest = max(len(ids) for ids in token_ids)
    trained = _context_length(Path(model)) or longest
    # Its C logging writes to stderr even with verbose=False (errors pass llama-cpp-python's
    # filter); a library never prints.
    with _llama_cpp_silenced():
        try:
            # A context no longer than needed, and logits kept for every position (logits_all):
            # context x vocabulary float32 values.
            llm = Llama(model_path=str(model), lora_path=None if lora is None else str(lora), logits_all=True,
                        n_ctx=max(longest, min(trained, 512)), n_batch=max(longest, 8),
                        n_threads=torch.get_num_threads(), n_gpu_layers=0, type_k=0, type_v=0, verbose=False)
        except (ValueError, RuntimeError) as error:
            text = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            raise DeltastoreError(f"llama.cpp cannot load {lora if lora is not None else model}: {text}") from None
        out = []
        try:
            for ids in token_ids:
                llm.reset()
                llm.eval(list(ids))
                scores = np.array(llm.scores[:len(ids)], dtype=np.float32)
                out.append(torch.log_softmax(torch.from_numpy(scores), dim=-1))
        finally:
            llm.close()
        return out


_SILENT: Any = None


@contextmanager
def _llama_cpp_silenced() -> Iterator[None]:
    """llama.cpp's C log routed to nothing while inside, then back to the callback it had
    (llama-cpp-python's own, which prints to stderr)."""
    global _SILENT
    import ctypes

    import llama_cpp

    if _SILENT is None:
        _SILENT = llama_cpp.llama_log_callback(lambda level, text, user_data: None)  # kept alive for C
    callback, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(user_data))
    llama_cpp.llama_log_set(_SILENT, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(callback, user_data)


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


def _check_out(out: Path, max_kl: float | None) -> None:
    if max_kl is not None and not (isinstance(max_kl, (int, float)) and max_kl >= 0):
        raise DeltastoreError(f"--max-kl must be a number of at least 0, got {max_kl!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DeltastoreError(f"{out} exists; choose a new one")


def export_measured(bench: ExportBench, out: str | os.PathLike, *, write: Callable[[Path, int], Any],
                    read_back: Callable[[Path], Mapping[str, torch.Tensor]] | None = None, rank: int,
                    max_kl: float | None = None, progress: Callable[[int, int], None] | None = None,
                    measure: Callable[[Path], Fidelity] | None = None) -> MeasuredExport:
    """``write(path, rank)`` an export to ``out`` and measure what ``read_back(path)`` (the
    merged weights) gives, or what ``measure(path)`` says; with ``max_kl``, the smallest rank of
    ``rank_ladder(rank)`` whose KL is at most ``max_kl`` (``KlNotReached`` where even ``rank`` is
    above it; nothing is written)."""
    out = Path(out)
    _check_out(out, max_kl)
    out.parent.mkdir(parents=True, exist_ok=True)
    if measure is None:
        measure = lambda path: bench.measure(read_back(path))  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tried: dict[int, tuple[float, Fidelity, Any, Path]] = {}

    def attempt(r: int) -> tuple[float, Fidelity, Any, Path]:
        if r not in tried:
            path = work / f"rank-{r}" / out.name
            path.parent.mkdir()
            written = write(path, r)
            fidelity = measure(path)
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

        out = Path(out)
        _check_out(out, max_kl)
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.base.", dir=out.parent))
        try:
            base_gguf, note = _base_for_llama_cpp(source, scratch)

            def measure(path: Path) -> Fidelity:
                if base_gguf is None:
                    return bench.measure(merged(source, read_gguf_lora(path, source)))
                return bench.probe.compare(llama_cpp_log_probs(base_gguf, bench.probe.token_ids, lora=path))

            m = export_measured(bench, out, write=write, rank=top, max_kl=max_kl, progress=progress,
                                measure=measure)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return _ran_in(m, base_gguf is not None, note)
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
    note = llama_cpp_missing()

    def measure(path: Path) -> Fidelity:
        if note is not None:
            return bench.measure(read_gguf_model(path, source))
        return bench.probe.compare(llama_cpp_log_probs(path, bench.probe.token_ids))

    m = export_measured(bench, out, write=lambda path, _: export_gguf(store, ref, path, dtype=dtype, base_weights=source),
                        rank=1, progress=progress, measure=measure)
    return _ran_in(m, note is None, note)


def _base_for_llama_cpp(source: Any, scratch: Path) -> tuple[Path | None, str | None]:
    """The base as a GGUF model file in ``scratch`` (f32) for llama.cpp to load a GGUF LoRA onto,
    or None and why not."""
    missing = llama_cpp_missing()
    if missing is not None:
        return None, missing
    try:
        return export_base_gguf(source, scratch / "base.gguf", dtype="f32").out, None
    except GgufExportError as error:
        return None, f"the base cannot be written as a GGUF model for llama.cpp to load the LoRA onto ({error})"


def _ran_in(m: MeasuredExport, llama_cpp: bool, note: str | None) -> MeasuredExport:
    if llama_cpp:
        return replace(m, fidelity=replace(m.fidelity, runtime="llama.cpp"))
    return replace(m, fidelity=replace(m.fidelity, runtime="torch", runtime_note=f"torch's estimate on the file's "
                                       f"dequantised weights, not llama.cpp's: {note}"))


#: The largest rank ``--max-kl`` tries when no --rank is given.
DEFAULT_SEARCH_RANK = 128
