"""commit --against on a real model: the three SmolLM2-135M-Instruct stances stored against the
base, and stored as one shared version (their mean) plus three versions against it.

    python examples/chains_smollm.py     # writes its section of examples/RESULTS.md

Uses examples/smollm.py for the base folder and the (cached) fine-tunes. Commits to a temporary
store: each stance against the base, the shared version (base + the mean of the three deltas,
written by export --mix and committed like a fine-tune), and each stance against it; checks that
every chained version exports its fine-tune bit for bit. Then, per stance, `compare` with an
"against shared" row gives the bytes and the KL of int4 both ways. Its section of RESULTS.md sits
between two markers, so that the other examples each rewrite only their own part.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import smollm  # noqa: E402

from deltastore import Store  # noqa: E402
from deltastore.analysis.compare import compare  # noqa: E402
from deltastore.core.hashing import tensor_id  # noqa: E402
from deltastore.patching.mix import export_mix  # noqa: E402
from deltastore.weights.models import open_model  # noqa: E402
from deltastore.core.units import size  # noqa: E402

BEGIN, END = "<!-- chains_smollm.py -->", "<!-- end chains_smollm.py -->"


def _same_model(store: Store, ref: str, folder: Path) -> bool:
    """Whether what apply of ``ref`` gives is ``folder``'s weights, tensor for tensor."""
    source = open_model(folder)
    infos, tensor = store.materialize(ref)
    return sorted(infos) == sorted(source.names) and all(
        tensor_id(tensor(name)) == tensor_id(source.get(name)) for name in source.names)


def _kl(value: float | None) -> str:
    return "-" if value is None else ("0" if value == 0 else f"{value:.3g}")


def main() -> None:
    base = smollm.base_folder()
    tuned = {stance: smollm.finetune(base, stance) for stance in smollm.stances()["stances"]}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.init(Path(tmp) / "store")
        plain = {s: store.commit(s, folder, base=str(base)).bytes_stored for s, folder in tuned.items()}
        mean = export_mix(store.reader, {s: 1 / len(tuned) for s in tuned}, Path(tmp) / "shared")
        shared = store.commit("shared", mean, base=str(base)).bytes_stored
        chained = {}
        for s, folder in tuned.items():
            chained[s] = store.commit(f"{s}-on-shared", folder, base=str(base), against="shared",
                                      new_stance=True).bytes_stored
            assert _same_model(store, f"{s}-on-shared", folder), s
        commits = time.perf_counter() - start
        rows = {}
        for s, folder in tuned.items():
            c = compare(base, folder, encodings=("lossless", "int4"), ranks=(), full=(), store=store,
                        against=["shared"], prompts=HERE / "prompts.txt", chat=True)
            rows[s] = c
        store.close()
    seconds = time.perf_counter() - start
    full = next(iter(rows.values())).full_bytes
    total_plain, total_chained = sum(plain.values()), shared + sum(chained.values())
    lines = [
        BEGIN,
        f"## commit --against: the three stances stored against one shared version ({seconds:.0f} s)",
        "",
        "Written by `python examples/chains_smollm.py`: the three stance fine-tunes above. \"Against the base\": "
        "each committed as usual. \"Against shared\": a shared version (base + the mean of the three deltas, "
        "written by `export --mix` and committed lossless) and each stance committed with `--against shared`, "
        "every chained version checked to give its fine-tune bit for bit. Bytes are the store's (zstd, "
        f"headers included); the full fp32 copy is {size(full)}.",
        "",
        "| stance | lossless against the base | lossless against shared |",
        "| --- | ---: | ---: |",
        *(f"| {s} | {size(plain[s])} | {size(chained[s])} |" for s in tuned),
        f"| shared (the mean) | - | {size(shared)} |",
        f"| **all three** | **{size(total_plain)}** | **{size(total_chained)}** |",
        "",
        f"Lossless, one shared version plus three against it take {total_chained / total_plain:.2f} times the "
        f"bytes of the three against the base ({size(total_chained)} vs {size(total_plain)}): each stance against "
        f"the shared version is {min(chained[s] / plain[s] for s in tuned):.3f} to "
        f"{max(chained[s] / plain[s] for s in tuned):.3f} of itself against the base, and the shared version "
        f"costs {size(shared)} of its own.",
        "",
        "The same through `compare BASE MODEL --encodings lossless,int4 --against shared --prompts "
        "examples/prompts.txt --chat` for each stance: KL(fine-tuned || stored) of the next-token "
        "distributions and top-1 agreement (lossless rows are exact: KL 0).",
        "",
        "| stance | base alone: KL | int4 against the base: bytes, KL, top-1 | int4 against shared: bytes, KL, top-1 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for s, c in rows.items():
        ours, chain = c.row("delta int4"), c.row("against shared@1, int4")
        lines.append(f"| {s} | {_kl(c.row('base (nothing kept)').kl)} | {size(ours.bytes)}, {_kl(ours.kl)}, "
                     f"{ours.top1:.1%} | {size(chain.bytes)}, {_kl(chain.kl)}, {chain.top1:.1%} |")
    int4_plain = sum(c.row("delta int4").bytes for c in rows.values())
    int4_chained = sum(c.row("against shared@1, int4").bytes for c in rows.values())
    lines += [
        "",
        f"int4: {size(int4_plain)} for the three against the base, {size(int4_chained)} against the shared "
        f"version ({int4_chained / int4_plain:.3f}), plus the shared version itself. (Commits and checks: "
        f"{commits:.0f} s.)",
        "",
        "What it shows: on these stances a chain does not pay. A delta against the shared version is a few "
        "percent smaller than against the base, far less than the shared version costs: about half of each "
        "stance's delta energy is its own (the similarity section above), and an Adam fine-tune moves every "
        "element, so the bytes follow the number of elements far more than their size. A chain pays where "
        "one version is close to another (tests/test_chain.py: a stance moved a little further, stored against "
        "its previous step, takes fewer bytes than against the base); that is not measured here.",
        END,
    ]
    section = "\n".join(lines)
    smollm.write_section(HERE / "RESULTS.md", section, BEGIN, END)
    print(section)


if __name__ == "__main__":
    main()
