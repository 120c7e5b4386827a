"""Three stances, end to end, on a real small model (SmolLM2-135M-Instruct).

    python examples/stances.py [--quick] [--workdir DIR]

It fully fine-tunes curious-uncertainty, confident-expertise and engaged-difficulty (5 examples
each, examples/stances.json; AdamW, 2 epochs), then, with deltastore:
  1. registers the base and commits each stance as int4, plus a lossless version of one;
  2. analyzes where the three changed the model (a heatmap);
  3. compares, for one stance, what each way of storing it costs and keeps;
  4. in ONE loaded model, switches base -> each stance -> base, printing the answers to the same
     questions after each switch and the time each switch took;
  5. pushes the three stances to a local Hub server (tests/hubserver.py) and pulls them into a
     second store, whose stances give the same answers.
Everything printed is measured in this run. It checks its own claims and exits non-zero when one
fails: each stance changes the answers, revert gives the base's answers token for token, and the
pulled store gives identical answers. --quick shortens training and the comparison (for CI).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The local Hub server speaks plain LFS; the client must choose that before it is imported.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import smollm  # noqa: E402

from deltastore import Store  # noqa: E402
from deltastore.analysis.compare import compare  # noqa: E402
from deltastore.analysis.plots import analyze_plot, plot  # noqa: E402
from deltastore.analysis.refanalysis import analyze  # noqa: E402


def answers(model, tok, questions: list[str], tokens: int) -> list[str]:
    return [smollm.answer(model, tok, q, max_new_tokens=tokens) for q in questions]


def show(label: str, seconds: float | None, replies: list[str], questions: list[str]) -> None:
    took = f" (switch took {seconds * 1000:.1f} ms)" if seconds is not None else ""
    print(f"\n[{label}]{took}")
    for q, a in zip(questions, replies):
        print(f"  {q}\n    -> {a}")


class LocalHub:
    """tests/hubserver.py in a child process, for the push and pull steps."""

    def __init__(self, root: Path):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hubserver.py"), "--root", str(root)],
                                     stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short training and comparison (CI)")
    parser.add_argument("--workdir", type=Path, help="keep the stores, plots and Hub here (default: a temporary folder)")
    args = parser.parse_args(argv)
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    started = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="deltastore-stances-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HOME", str(work / "hf-home"))
    data = smollm.stances()
    questions = data["eval_questions"][:2] if args.quick else data["eval_questions"]
    tokens = 16 if args.quick else 40
    failures: list[str] = []

    # 0. The base and the three fine-tunes (cached after the first run).
    t = time.perf_counter()
    base = smollm.base_folder()
    tuned = {stance: smollm.finetune(base, stance, quick=args.quick) for stance in data["stances"]}
    print(f"base {base}\nfine-tunes ready in {time.perf_counter() - t:.1f} s (cached ones are reused)")

    # 1. Register, commit.
    store = Store.init(work / "store")
    t = time.perf_counter()
    b = store.add_base(base, name="smollm2-135m-instruct")
    print(f"\nbase add: {b.id} ({b.tensor_count} tensors, {b.bytes / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s")
    first = next(iter(tuned))
    t = time.perf_counter()
    r = store.commit(first, tuned[first], base=b, encoding="lossless", message="lossless")
    print(f"commit {r.version.ref} lossless: {r.bytes_stored / 1e6:.1f} MB in {time.perf_counter() - t:.1f} s")
    for stance, folder in tuned.items():
        t = time.perf_counter()
        r = store.commit(stance, folder, base=b, encoding="int4", message="int4, group 64")
        print(f"commit {r.version.ref} int4: {r.bytes_stored / 1e6:.1f} MB "
              f"({r.bytes_stored / b.bytes:.1%} of the full copy) in {time.perf_counter() - t:.1f} s")

    # 2. Where did each stance change the model?
    t = time.perf_counter()
    analyses = analyze(store, list(tuned))
    analyze_plot(analyses, work / "analyze.png")
    print(f"\nanalyze ({time.perf_counter() - t:.1f} s, heatmap {work / 'analyze.png'}): largest relative change")
    for a in analyses:
        top = max(a.rows, key=lambda row: row.rel_change)
        print(f"  {a.ref}: layer {top.layer} {top.module} ||dW||/||W|| = {top.rel_change:.2e}")

    # 3. What does each way of storing one stance cost, and keep?
    t = time.perf_counter()
    prompts = data["fidelity_prompts"][:2] if args.quick else data["fidelity_prompts"]
    c = compare(base, tuned[first], prompts=prompts,
                encodings=("int4",) if args.quick else ("lossless", "int8", "int4", "nf4", "1bit"),
                ranks=(8,) if args.quick else (8, 32), full=() if args.quick else ("int4",))
    plot(c, work / "compare.png", title=f"{first}: size vs KL")
    print(f"\ncompare {first} ({time.perf_counter() - t:.1f} s, plot {work / 'compare.png'}):")
    for row in c.rows:
        kl = "-" if row.kl is None else f"{row.kl:.2g}"
        print(f"  {row.label:28s} {row.bytes / 1e6:8.1f} MB  {row.fraction:6.3f} of the full copy  KL {kl}")

    # 4. One loaded model, switched between stances.
    model, tok = smollm.load(base)
    base_answers = answers(model, tok, questions, tokens)
    show("base", None, base_answers, questions)
    stance_answers = {}
    for stance in tuned:
        t = time.perf_counter()
        store.switch(model, stance)
        seconds = time.perf_counter() - t
        stance_answers[stance] = answers(model, tok, questions, tokens)
        show(f"{stance} (int4)", seconds, stance_answers[stance], questions)
        if stance_answers[stance] == base_answers:
            failures.append(f"{stance} gives the base's answers")
    t = time.perf_counter()
    store.switch(model, None)
    seconds = time.perf_counter() - t
    reverted = answers(model, tok, questions, tokens)
    show("base again (revert)", seconds, reverted, questions)
    if reverted != base_answers:
        failures.append("after revert the answers differ from the base's")

    # 5. Share: push to a Hub, pull into another store, same answers.
    from deltastore.sharing.hub import pull, push

    hub = LocalHub(work / "hub")
    try:
        repo = "researcher/smollm2-stances"
        t = time.perf_counter()
        pushed = push(store, list(tuned), repo, endpoint=hub.url, progress=False)
        print(f"\npush {', '.join(tuned)} to {repo} on {hub.url}: {time.perf_counter() - t:.1f} s")
        other = Store.init(work / "pulled-store")
        other.add_base(base, name="smollm2-135m-instruct")
        t = time.perf_counter()
        pulled = pull(other, repo, endpoint=hub.url, progress=False)
        print(f"pull into a second store, every hash checked: {time.perf_counter() - t:.1f} s")
        for stance in tuned:
            if other.resolve(stance).id != store.resolve(stance).id:
                failures.append(f"{stance}: the pulled version id differs")
            other.switch(model, stance)
            again = answers(model, tok, questions, tokens)
            same = again == stance_answers[stance]
            print(f"  {stance} from the pulled store: {'the same answers' if same else 'DIFFERENT answers'}")
            if not same:
                failures.append(f"{stance}: the pulled store gives other answers")
        other.switch(model, None)
        del pushed, pulled
    finally:
        hub.close()

    print(f"\nstore: {store.stats().bytes_stored / 1e6:.1f} MB for {len(tuned)} stances, "
          f"{len(store.log())} versions; the base alone is {b.bytes / 1e6:.0f} MB")
    print(f"ran in {time.perf_counter() - started:.0f} s; work folder {work}")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
