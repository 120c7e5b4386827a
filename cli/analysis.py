"""Commands that measure a fine-tune: compare (what each way of storing it costs and keeps)
and analyze (where it changed the model)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from deltastore import Store

from .options import (PEFT_DTYPES, Dtype, base_path_option, finite, json_option, lower_case, mix_weights, number_list,
                      prompt_options, store_if, top_option, with_store)
from .output import echo, emit_json, largest, progress, size, table, to_jsonable

# Library modules that import torch (or transformers, matplotlib, huggingface_hub) are imported
# inside the commands that use them: this module is loaded for its light commands too, and those
# must start without them (cli/main.py, tests/test_startup.py).

if TYPE_CHECKING:
    from deltastore.analysis.compare import Comparison


def _kl(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.3g}"


@click.command("compare")
@click.argument("base", type=click.Path(exists=True))
@click.argument("model", type=click.Path(exists=True))
@click.option("--encodings", "encodings_text", default="lossless,int8,int4,nf4,fp4,1bit", show_default=True,
              callback=lower_case,
              help="Delta encodings to compare, comma-separated (lowrank:R, mixedrank:R and mixedrank-aw:R too).")
@click.option("--ranks", "ranks_text", default="8,32", show_default=True,
              help="LoRA ranks to compare, comma-separated ('' for none).")
@click.option("--full", "full_text", default="int4,nf4", show_default=True, callback=lower_case,
              help="Encodings of the whole model quantised, comma-separated ('' for none).")
@click.option("--select", "selects", multiple=True, metavar="SPEC",
              help="A selection to compare (repeatable): KEY=VALUE pairs joined by ';', keys include, exclude, "
                   "top_k, min_rel_change, energy, encoding; e.g. 'include=layers\\.15\\.self_attn\\.v_proj' "
                   "or 'top_k=2;encoding=int4'.")
@click.option("--mix", "mixes", multiple=True, callback=mix_weights, metavar="REF=A,REF=B",
              help="A row of stored versions of the store at a strength, or mixed (repeatable): base + "
                   "A*delta(REF) + B*delta(REF) ..., as export --mix writes it; e.g. curious=0.5.")
@click.option("--against", "against", multiple=True, metavar="REF",
              help="Rows of what `commit MODEL --against REF` would store (REF a version of the store, of BASE), "
                   "one per delta encoding (repeatable).")
@click.option("--prompts", type=click.Path(dir_okay=False), metavar="FILE",
              help="Measure fidelity on these prompts (one per line); BASE must be a Hugging Face model folder.")
@click.option("--calibration", type=click.Path(dir_okay=False), metavar="FILE",
              help="Prompts (one per line) that mixedrank-aw:R rows are fitted on (MODEL's activations on them); "
                   "measure on other --prompts.")
@prompt_options
@click.option("--group-size", type=int, help="Group size of int8/int4 (default 64).")
@click.option("--lora-dtype", type=Dtype(["bf16", "f16", "f32"]), default="bf16", show_default=True,
              help="The dtype of the LoRA factors.")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="PNG", help="Draw size against KL (needs --prompts).")
@json_option
@click.pass_context
def compare_command(ctx: click.Context, base: str, model: str, encodings_text: str, ranks_text: str,
                    full_text: str, selects: tuple[str, ...], mixes: list[dict[str, float]], against: tuple[str, ...],
                    prompts: str | None, calibration: str | None, chat: bool, tokenizer: str | None,
                    group_size: int | None, lora_dtype: str,
                    plot: str | None, as_json: bool) -> None:
    """What each way of storing fine-tune MODEL of BASE costs, and how much of it each keeps.

    One row per way: nothing kept (the base), the full copy (raw, zstd, quantised), every delta
    encoding, a LoRA of each rank (R*(m+n) per changed matrix; the share of each delta's energy
    rank R holds), each --select, --mix and --against (versions of the store). Bytes are what the
    store would write; with --prompts, the mean KL(fine-tuned || stored) and top-1 agreement."""
    from deltastore.analysis.compare import compare as run_compare
    from deltastore.analysis.plots import plot as draw

    if plot and not prompts:
        raise click.UsageError("--plot draws KL against size: give --prompts FILE too")
    options = encoding_options(group_size, calibration, model, chat, tokenizer)
    with progress("comparing", enabled=not as_json) as cb:
        c = run_compare(base, model, encodings=number_list(encodings_text, "--encodings"),
                        ranks=number_list(ranks_text, "--ranks", int), full=number_list(full_text, "--full"),
                        selections=selects, prompts=prompts, chat=chat, tokenizer=tokenizer, lora_dtype=PEFT_DTYPES[lora_dtype],
                        encoding_options=options, store=store_if(ctx, bool(mixes or against)), mixes=mixes,
                        against=against, progress=cb)
    if plot:
        draw(c, plot)
    if as_json:
        return emit_json(finite({**to_jsonable(c), "plot": plot}))
    render_comparison(c, plot)


def encoding_options(group_size: int | None, calibration: str | None, model: str, chat: bool,
                     tokenizer: str | None) -> dict:
    """compare's options for the encodings: the group size, and the activations the model meets
    on the calibration prompts (for mixedrank-aw)."""
    options: dict = {"group_size": group_size} if group_size is not None else {}
    if calibration is not None:
        from deltastore.metrics.calibration import calibrate

        options["calibration"] = calibrate(model, calibration, chat=chat, tokenizer=tokenizer).covariances
    return options


def render_comparison(c: Comparison, plot: str | None = None) -> None:
    what = (f"fidelity over {c.prompts} prompts ({c.positions} positions)" if c.fidelity_skipped is None
            else f"no fidelity: {c.fidelity_skipped}")
    echo(f"{c.changed} of {c.tensors} tensors changed; full copy {size(c.full_bytes)} ({c.dtype}); {what}")
    table([[r.label, size(r.bytes), f"{r.fraction:.4f}" if r.bytes else "0", r.tensors,
            "-" if r.energy is None else f"{r.energy:.3f}", _kl(r.kl),
            "-" if r.top1 is None else f"{r.top1:.1%}", r.note] for r in c.rows],
          ["stored as", "bytes", "of full", "tensors", "energy", "KL", "top-1", "note"])
    if plot:
        echo(f"wrote {plot}")


@click.command()
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="PNG",
              help="A heatmap: layers down, module kinds across, one panel per ref, one colour scale.")
@click.option("--value", type=click.Choice(["rel_change", "energy", "energy_share", "rank90", "rank99"]),
              default="rel_change", show_default=True, help="What the heatmap shows.")
@click.option("--all", "show_all", is_flag=True, help="List unchanged (layer, module) cells too.")
@click.option("--spectrum", metavar="NAME",
              help="Instead: the singular values of one tensor in the base, in each ref and of each delta "
                   "(--plot draws them).")
@click.option("--similarity", "similar", is_flag=True,
              help="Instead: how alike the refs' deltas are (two refs or more, one base): the cosine similarity "
                   "of every pair per layer and module and over the whole model, and the share of each delta's "
                   "energy along the mean of the deltas (shared) and off it (own). --plot draws the cosines, "
                   "one panel per pair.")
@click.option("--alpha", "with_alpha", is_flag=True,
              help="Add WeightWatcher's power-law alpha of each row's matrix in the base and in the "
                   "fine-tune, and its shift (alpha_ft - alpha_base) / alpha_base (needs "
                   "pip install 'deltastore[alpha]'; one fit takes about 0.06 s for a 576x576 matrix, "
                   "3 s for 8192x2048, on two CPU cores).")
@top_option
@base_path_option
@json_option
@with_store(readonly=True)
def analyze(store: Store, refs: tuple[str, ...], plot: str | None, value: str, show_all: bool,
            spectrum: str | None, similar: bool, with_alpha: bool, top: int | None, base_path: str | None,
            as_json: bool) -> None:
    """Which layers and modules each version changed, and how: per layer and module kind, the
    relative change ||dW||/||W||, the share of the squared delta, the effective rank (the rank
    holding 90% and 99% of the delta's energy) and the top singular values. dW is what apply
    produces minus the base, so versions of any encoding compare. --alpha adds WeightWatcher's
    power-law alpha of the weights before and after (the mean over a row's matrices; "-" where
    it fits none: vectors, and matrices outside its default size limits). A summary first."""
    from deltastore.analysis.plots import analyze_plot
    from deltastore.analysis.refanalysis import analyze as run_analyze

    if with_alpha and spectrum:
        raise click.UsageError("--alpha adds columns to the analysis table; --spectrum shows one tensor instead")
    if similar and (spectrum or with_alpha):
        raise click.UsageError("--similarity compares the refs' deltas; leave out --spectrum and --alpha")
    if similar:
        return _similarity(store, refs, plot, base_path, show_all, as_json)
    if spectrum:
        return show_spectra(store, refs, spectrum, plot, base_path, as_json)
    with progress("analyzing", enabled=not as_json) as cb:
        results = run_analyze(store, list(refs), base_weights=base_path, alpha=with_alpha, progress=cb)
    if plot:
        analyze_plot(results, plot, value=value)
    if as_json:
        return emit_json(finite(to_jsonable({"refs": results, "plot": plot})))
    render_analyses(results, show_all, top)
    if plot:
        echo(f"wrote {plot}")


def show_spectra(store: Store, refs: tuple[str, ...], spectrum: str, plot: str | None, base_path: str | None,
                 as_json: bool) -> None:
    """analyze --spectrum NAME: one tensor's singular values instead of the table."""
    from deltastore.analysis.plots import spectrum_plot
    from deltastore.analysis.refanalysis import spectra

    found = spectra(store, list(refs), spectrum, base_weights=base_path)
    if plot:
        spectrum_plot(found, plot)
    if as_json:
        return emit_json({"spectra": to_jsonable(found), "plot": plot})
    echo(f"singular values of {spectrum} (largest 5)")
    table([["base", *(f"{x:.4g}" for x in found[0].base[:5])]]
          + [[f"{s.ref}", *(f"{x:.4g}" for x in s.tuned[:5])] for s in found]
          + [[f"{s.ref} delta", *(f"{x:.4g}" for x in s.delta[:5])] for s in found],
          ["", "1", "2", "3", "4", "5"])
    return echo(f"wrote {plot}") if plot else None


def render_analyses(results: list[Any], show_all: bool, top: int | None = None) -> None:
    for k, a in enumerate(results):
        if k:
            echo()
        rows = [r for r in a.rows if show_all or r.energy > 0 or r.rel_change != 0]
        echo(f"{a.ref} ({a.encoding}, {a.tensors} tensors stored): {len(rows)} of {len(a.rows)} "
             f"(layer, module) cells {'listed' if show_all else 'changed'}")
        summary = largest([(_cell(r), r.energy) for r in a.rows], sum(r.energy for r in a.rows), "the energy")
        changed = sum(1 for c in a.changes.values() if c.energy > 0)
        echo(f"{changed} of {len(a.changes)} tensors changed" + (f"; {summary}" if summary else ""))
        if top:
            listed = len(rows)
            rows = sorted(rows, key=lambda r: -r.energy)[:top]
            if listed > top:
                echo(f"(listed: the {top} largest of {listed} cells)")
        alpha_headers = ["alpha base", "alpha ft", "alpha shift"] if a.row_alphas is not None else []
        table([["-" if r.layer is None else r.layer, r.module, r.tensors, f"{r.rel_change:.3g}",
                *_alpha_cells(a, r), f"{r.energy_share:.1%}", r.rank90, r.rank99,
                " ".join(f"{x:.3g}" for x in r.singular_values[:3]) or "-"] for r in rows],
              ["layer", "module", "tensors", "rel change", *alpha_headers, "energy", "rank90", "rank99",
               "top singular values"])


def _cell(row: Any) -> str:
    return row.module if row.layer is None else f"layer {row.layer} {row.module}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _cosine(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _similarity(store: Store, refs: tuple[str, ...], plot: str | None, base_path: str | None, show_all: bool,
                as_json: bool) -> None:
    """analyze --similarity: the whole model's figures, then one row per (layer, module)."""
    from deltastore.analysis.plots import similarity_plot
    from deltastore.analysis.similarity import similarity

    with progress("comparing deltas", enabled=not as_json) as cb:
        found = similarity(store, list(refs), base_weights=base_path, progress=cb)
    if plot:
        similarity_plot(found, plot)
    if as_json:
        return emit_json(finite({**to_jsonable(found), "plot": plot}))
    pairs = [f"{found.refs[i]} vs {found.refs[j]}" for i, j in found.pairs]
    echo("cosine similarity of the deltas over the whole model")
    table([[label, _cosine(c)] for label, c in zip(pairs, found.model.cosine)], ["pair", "cosine"])
    echo()
    echo("each delta's energy along the mean of the deltas (shared) and off it (own)")
    table([[ref, f"{energy:.4g}", _share(shared), _share(own)]
           for ref, energy, shared, own in zip(found.refs, found.model.energy, found.model.shared, found.model.own)],
          ["ref", "energy ||dW||^2", "shared", "own"])
    echo()
    rows = [r for r in found.rows if show_all or any(e > 0 for e in r.energy)]
    echo(f"per layer and module: {len(rows)} of {len(found.rows)} cells {'listed' if show_all else 'changed'}")
    table([["-" if r.layer is None else r.layer, r.module, r.tensors, *(_cosine(c) for c in r.cosine),
            *(_share(s) for s in r.shared)] for r in rows],
          ["layer", "module", "tensors", *(f"cos {i + 1}-{j + 1}" for i, j in found.pairs),
           *(f"shared {k + 1}" for k in range(len(found.refs)))])
    echo("(" + ", ".join(f"{k + 1} = {ref}" for k, ref in enumerate(found.refs)) + ")")
    if found.skipped:
        echo(f"left out, no delta defined (shape or dtype differs from the base's): {len(found.skipped)} tensors")
    if plot:
        echo(f"wrote {plot}")


def _alpha_cells(a: Any, row: Any) -> list[str]:
    """Alpha base, alpha ft and the shift of one analyze row ("-" where WeightWatcher fits
    none), or nothing without --alpha, so that the table is as it was."""
    if a.row_alphas is None:
        return []
    found = a.row_alphas.get((row.layer, row.module))
    if found is None:
        return ["-", "-", "-"]
    return [_alpha(found.alpha_base), _alpha(found.alpha_ft),
            "-" if found.alpha_shift is None else f"{100 * found.alpha_shift:+.3g}%"]  # -36.6%, +0.0121%


def _alpha(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
