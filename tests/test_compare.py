"""compare: the bytes and fidelity of every way of storing a fine-tune, commit --encoding auto,
and the plot. Tiny transformers Llama models built in code (tests/tiny_lm.py)."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from safetensors import safe_open  # noqa: E402

from cli.main import cli  # noqa: E402
from deltastore import Store  # noqa: E402
from deltastore.analysis.auto import choose_encoding  # noqa: E402
from deltastore.core.hashing import bytes_id  # noqa: E402
from deltastore.analysis.compare import CompareError, compare, parse_select  # noqa: E402
from deltastore.analysis.plots import plot  # noqa: E402
from deltastore.metrics.fidelity import FidelityError  # noqa: E402
from tiny_lm import adam_like, low_rank, pair, prompts_file  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adam_pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adam")
    base, ft = pair(tmp, adam_like(0.02))
    return base, ft, prompts_file(tmp)


@pytest.fixture(scope="module")
def adam_comparison(adam_pair):
    base, ft, prompts = adam_pair
    return compare(base, ft, encodings=("lossless", "int8", "int4", "1bit", "int8"), ranks=(4,),
                   selections=[r"include=layers\.1\.self_attn\.v_proj", "top_k=2;encoding=int4"],
                   prompts=prompts)


def shapes(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def test_an_exactly_rank_4_delta_is_all_held_at_rank_4_and_costs_4_m_plus_n(tmp_path):
    base, ft = pair(tmp_path, low_rank(4))
    c = compare(base, ft, encodings=(), full=(), ranks=(2, 4, 8))

    matrices = [s for s in shapes(ft).values() if len(s) == 2]
    assert c.changed == len(matrices)  # norms untouched
    r4 = c.row("LoRA r=4")
    assert r4.energy == pytest.approx(1.0, abs=1e-9)
    assert r4.bytes == sum(4 * (m + n) for m, n in matrices) * 2  # bf16 factors
    assert r4.tensors == len(matrices)
    assert c.row("LoRA r=8").energy == pytest.approx(1.0, abs=1e-9)
    assert c.row("LoRA r=8").bytes == 2 * r4.bytes
    assert c.row("LoRA r=2").energy < 0.9
    # No prompts: bytes only, and the reason says so.
    assert c.fidelity_skipped == "no prompts given"
    assert all(row.kl is None for row in c.rows if row.kind not in ("full",))
    assert c.row("base (nothing kept)").bytes == 0


def test_bytes_are_what_commit_stores(tmp_path, adam_pair):
    base, ft, _ = adam_pair
    c = compare(base, ft, encodings=("lossless", "int4", "nf4", "lowrank:4"), ranks=(), full=())
    store = Store.init(tmp_path / "store")
    for spec in ("lossless", "int4", "nf4", "lowrank:4"):
        result = store.commit(spec.replace(":", "-"), ft, base=str(base), encoding=spec)
        assert c.row(f"delta {spec}").bytes == result.bytes_stored, spec
        assert c.row(f"delta {spec}").tensors == result.tensors_stored
    assert c.row("full copy (fp32)").bytes == sum(
        math.prod(s) * 4 for s in shapes(ft).values())


def test_kl_is_zero_for_lossless_and_grows_as_the_encoding_coarsens(adam_comparison):
    c = adam_comparison
    assert c.fidelity_skipped is None and c.prompts == 5 and c.positions > 20
    lossless, int8, int4, one_bit = (c.row(f"delta {s}") for s in ("lossless", "int8", "int4", "1bit"))
    base = c.row("base (nothing kept)")
    assert lossless.kl == 0.0 and lossless.top1 == 1.0
    assert 0.0 < int8.kl <= int4.kl <= one_bit.kl < base.kl
    assert int8.bytes > int4.bytes > one_bit.bytes
    assert c.row("full copy (fp32)").kl == 0.0 and c.row("full copy, zstd").kl == 0.0
    assert 0.0 < c.row("full model int4").kl
    assert c.row("full model int4").bytes < c.row("full copy (fp32)").bytes / 5
    # Each row starts from the fine-tune: measuring int8 again, after 1bit, gives the same.
    int8_again = [r for r in c.rows if r.label == "delta int8"][1]
    assert int8_again.kl == int8.kl and int8_again.bytes == int8.bytes


def test_lora_and_selection_rows(adam_comparison, adam_pair):
    c = adam_comparison
    lora = c.row("LoRA r=4")
    assert 0.0 < lora.energy < 1.0  # a dense delta is far from rank 4
    assert 0.0 < lora.kl < c.row("base (nothing kept)").kl
    # Norms are held whole (as modules_to_save), so all changed tensors count.
    assert lora.tensors == c.changed and "whole" in lora.note
    surgical = c.row(r"select include=layers\.1\.self_attn\.v_proj")
    assert surgical.tensors == 1 and surgical.kind == "selection" and surgical.spec == "lossless"
    assert 0.0 < surgical.energy < 0.1
    v_proj = shapes(adam_pair[1])["model.layers.1.self_attn.v_proj.weight"]
    assert surgical.bytes <= math.prod(v_proj) * 4 + 100
    # Keeping one tensor of many keeps little of the behaviour.
    assert surgical.kl > c.row("delta int4").kl
    top2 = c.row("select top_k=2;encoding=int4")
    assert top2.tensors == 2 and top2.spec == "int4"


def test_plot_writes_a_png_and_needs_fidelity(tmp_path, adam_comparison):
    out = plot(adam_comparison, tmp_path / "compare.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_fidelity = compare(*pair(tmp_path, low_rank(2))[:2], encodings=("int8",), ranks=(), full=())
    with pytest.raises(CompareError, match="--prompts"):
        plot(no_fidelity, tmp_path / "none.png")


def test_auto_picks_a_smaller_encoding_under_a_generous_bound(adam_pair):
    base, ft, prompts = adam_pair
    generous = choose_encoding(base, ft, prompts=prompts, max_kl=10.0)
    strict = choose_encoding(base, ft, prompts=prompts, max_kl=0.0)
    assert strict.encoding == "lossless" and strict.kl == 0.0
    assert generous.bytes < strict.bytes and generous.encoding != "lossless"
    assert generous.kl <= 10.0 and generous.base_kl > 0.0
    # Every candidate is sized; fidelity is measured smallest first, up to the first that fits:
    # under a generous bound that is the smallest of all, under a strict one every lossy one is
    # measured and rejected. Ranks a tiny matrix cannot hold are skipped, with a note.
    sized = [r for r in generous.candidates if "skipped" not in r.note]
    assert generous.bytes == min(r.bytes for r in sized)
    assert [r.spec for r in generous.candidates if r.kl is not None] == [generous.encoding]
    assert all(r.note.startswith("not measured: larger than") for r in sized if r.spec != generous.encoding)
    assert any("skipped" in r.note for r in generous.candidates if r.spec == "lowrank:128")
    lossy = [r for r in strict.candidates if r.spec != "lossless" and "skipped" not in r.note]
    assert {"int8", "int4", "nf4", "fp4", "1bit", "lowrank:8"} <= {r.spec for r in lossy}
    assert all(r.kl > 0.0 and r.note.startswith("rejected: KL") for r in lossy)
    # The same choice as measuring every candidate: the smallest whose KL fits.
    bound = sorted(r.kl for r in lossy)[len(lossy) // 2]
    middle = choose_encoding(base, ft, prompts=prompts, max_kl=bound)
    fitting = [r for r in lossy if r.kl <= bound] + [r for r in strict.candidates if r.spec == "lossless"]
    assert middle.encoding == min(fitting, key=lambda r: (r.bytes, r.kl)).spec


def test_commit_auto_records_fidelity_in_the_version(tmp_path, adam_pair):
    base, ft, prompts = adam_pair
    store = tmp_path / "store"
    runner = CliRunner()
    assert runner.invoke(cli, ["init", str(store)]).exit_code == 0

    def run(*args):
        return runner.invoke(cli, ["--store", str(store), *args])

    strict = run("commit", "s", str(ft), "--base", str(base), "--encoding", "auto", "--max-kl", "0",
                 "--prompts", str(prompts), "--json")
    assert strict.exit_code == 0, strict.output
    generous = run("commit", "s", str(ft), "--base", str(base), "--encoding", "auto", "--max-kl", "5",
                   "--prompts", str(prompts), "--json")
    assert generous.exit_code == 0, generous.output
    a, b = json.loads(strict.stdout), json.loads(generous.stdout)
    assert a["encoding"] == "lossless" and a["kl"] == 0.0
    assert b["encoding"] != "lossless" and b["bytes_stored"] < a["bytes_stored"]

    shown = json.loads(run("show", "s@2", "--json").stdout)
    assert shown["encoding"] == b["encoding"]
    meta = shown["metadata"]
    assert float(meta["fidelity.kl"]) == pytest.approx(b["kl"], rel=1e-5)
    assert float(meta["fidelity.max_kl"]) == 5.0 and meta["fidelity.prompts"] == "prompts.txt"
    assert meta["fidelity.prompts_id"] == bytes_id(prompts.read_bytes())  # which prompts, not only their name
    assert 0.0 < float(meta["fidelity.top1"]) <= 1.0 and float(meta["fidelity.base_kl"]) > 0.0
    assert "fidelity.kl=" in run("show", "s@2").output

    # A fixed encoding with --prompts is measured too; with --max-kl it refuses to go over.
    fixed = run("commit", "s", str(ft), "--base", str(base), "--encoding", "1bit", "--prompts", str(prompts),
                "--allow-empty")
    assert fixed.exit_code == 0 and "1bit: KL" in fixed.output
    # (--allow-empty: s@3 holds these weights in 1bit, which is refused before anything is measured.)
    refused = run("commit", "s", str(ft), "--base", str(base), "--encoding", "1bit", "--max-kl", "0",
                  "--prompts", str(prompts), "--allow-empty")
    assert refused.exit_code == 1 and "more than --max-kl" in refused.output
    logged = json.loads(run("log", "s", "--json").output)
    assert [r["number"] for r in logged] == [3, 2, 1]
    # log shows what the measured commits recorded (and the existing fields stay)
    assert logged[1]["kl"] == pytest.approx(b["kl"], rel=1e-5) and logged[1]["top1"] == pytest.approx(b["top1"], rel=1e-5)
    assert logged[1]["metadata"]["fidelity.kl"] == meta["fidelity.kl"] and logged[1]["base"] == shown["base"]
    text = run("log", "s").output.splitlines()
    assert text[0].split()[7:9] == ["KL", "top-1"]
    row = next(line for line in text if line.startswith("s@2 "))
    assert row.split()[9:11] == [f"{b['kl']:.3g}", f"{b['top1']:.1%}"]

    # auto says in one line each why it did not take the other candidates.
    explained = run("commit", "s", str(ft), "--base", str(base), "--encoding", "auto", "--max-kl", "0",
                    "--prompts", str(prompts))
    assert explained.exit_code == 0, explained.output
    lines = explained.output.splitlines()
    for spec in ("int8", "int4", "nf4", "fp4", "1bit", "lowrank:8"):
        assert sum(line.startswith(f"  {spec} (") and "rejected: KL" in line for line in lines) == 1, spec
    assert sum(line.startswith("  lowrank:128: skipped") for line in lines) == 1


def test_commit_auto_says_what_is_missing(tmp_path, adam_pair):
    base, ft, prompts = adam_pair
    store = tmp_path / "store"
    runner = CliRunner()
    runner.invoke(cli, ["init", str(store)])
    args = ["--store", str(store), "commit", "s", str(ft), "--base", str(base), "--encoding", "auto"]
    no_prompts = runner.invoke(cli, [*args, "--max-kl", "0.1"])
    assert no_prompts.exit_code == 2 and "--prompts FILE" in no_prompts.output
    no_bound = runner.invoke(cli, [*args, "--prompts", str(prompts)])
    assert no_bound.exit_code == 2 and "--max-kl K" in no_bound.output
    # A base without config.json cannot be loaded for fidelity.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
    no_config = runner.invoke(cli, ["--store", str(store), "commit", "s", str(ft), "--base", str(bare),
                                    "--encoding", "auto", "--max-kl", "0.1", "--prompts", str(prompts)])
    assert no_config.exit_code == 1 and "config.json" in no_config.output
    assert "Traceback" not in no_config.output
    missing = runner.invoke(cli, [*args, "--max-kl", "0.1", "--prompts", str(tmp_path / "nope.txt")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    assert json.loads(runner.invoke(cli, ["--store", str(store), "log", "--json"]).output) == []


def test_compare_on_the_command_line(tmp_path, adam_pair):
    base, ft, prompts = adam_pair
    runner = CliRunner()
    png = tmp_path / "c.png"
    out = runner.invoke(cli, ["compare", str(base), str(ft), "--encodings", "int8,1bit", "--ranks", "4",
                              "--full", "", "--select", "top_k=1", "--prompts", str(prompts),
                              "--plot", str(png), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    labels = [row["label"] for row in data["rows"]]
    assert labels == ["base (nothing kept)", "full copy (fp32)", "full copy, zstd", "delta int8",
                      "delta 1bit", "LoRA r=4", "select top_k=1"]
    assert data["plot"] == str(png) and png.stat().st_size > 10_000
    text = runner.invoke(cli, ["compare", str(base), str(ft), "--encodings", "int4", "--ranks", ""])
    assert text.exit_code == 0 and "delta int4" in text.output and "no fidelity" in text.output
    bad = runner.invoke(cli, ["compare", str(base), str(ft), "--plot", str(png)])
    assert bad.exit_code == 2 and "--prompts" in bad.output
    other = runner.invoke(cli, ["compare", str(base), str(tmp_path), "--json"])
    assert other.exit_code == 1 and "safetensors" in other.output


def test_models_that_do_not_match_and_bad_requests_are_refused(tmp_path, adam_pair):
    base, ft, prompts = adam_pair
    other, _ = pair(tmp_path, low_rank(1), name="other", hidden=16)
    with pytest.raises(CompareError, match="other shapes|lacks|has"):
        compare(base, other, encodings=("int8",), ranks=(), full=(), prompts=prompts)
    with pytest.raises(CompareError, match="KEY=VALUE"):
        parse_select("layers.1")
    with pytest.raises(CompareError, match="number"):
        parse_select("top_k=two")
    with pytest.raises(CompareError, match="twice"):
        parse_select("top_k=1;top_k=2")
    assert parse_select(r"include=a\.b;encoding=int4").selector.include == r"a\.b"
    with pytest.raises(CompareError, match="makes no sense"):
        compare(base, ft, full=("lossless",))
    with pytest.raises(FidelityError, match="no prompts"):
        empty = tmp_path / "empty.txt"
        empty.write_text("\n")
        compare(base, ft, prompts=empty)


def test_chat_prompts_go_through_the_chat_template(adam_pair):
    import transformers

    from deltastore.metrics.fidelity import FidelityProbe
    from tiny_lm import word_tokenizer

    base, ft, _ = adam_pair
    model = transformers.AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    tokenizer = word_tokenizer()
    with pytest.raises(FidelityError, match="no chat template"):
        FidelityProbe(model, ["why is the sky blue ?"], tokenizer=tokenizer, chat=True)
    tokenizer.chat_template = ("{% for m in messages %}i am {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}what{% endif %}")
    plain = FidelityProbe(model, ["why is the sky blue ?"], tokenizer=tokenizer)
    chat = FidelityProbe(model, ["why is the sky blue ?"], tokenizer=tokenizer, chat=True)
    assert (plain.positions, chat.positions) == (6, 9)  # "i am" before, "what" after
    assert chat.measure().kl == 0.0


def test_a_base_folder_without_a_tokenizer_asks_for_tokenizer_in_one_line(tmp_path, adam_pair):
    import shutil

    base, ft, prompts = adam_pair
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for file in base.iterdir():
        if not file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(file, bare / file.name)
    args = ["compare", str(bare), str(ft), "--encodings", "int8", "--ranks", "", "--full", "", "--prompts", str(prompts)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "holds no tokenizer" in result.output and "--tokenizer" in result.output
    for tokenizer in (base, base / "tokenizer.json"):
        given = CliRunner().invoke(cli, [*args, "--tokenizer", str(tokenizer), "--json"])
        assert given.exit_code == 0, given.output
        assert json.loads(given.stdout)["positions"] > 0
    with pytest.raises(FidelityError, match="--tokenizer"):
        compare(bare, ft, encodings=("int8",), ranks=(), full=(), prompts=prompts, tokenizer=tmp_path / "nothing")


def test_mix_rows_measure_stored_versions_at_a_strength(tmp_path, adam_pair):
    base, ft, prompts = adam_pair
    store = Store.init(tmp_path / "store")
    store.commit("curious", ft, base=str(base), encoding="int4")
    other = pair(tmp_path, low_rank(2), seed=0)[1]  # another fine-tune of the same base
    store.commit("confident", other, base=str(base), encoding="lossless", new_stance=True)
    c = compare(base, ft, encodings=("int4",), ranks=(), full=(), prompts=prompts, store=store,
                mixes=[{"curious": 1.0}, {"curious": 0.0}, {"curious": 0.5}, {"curious": 0.5, "confident": 0.5}])
    one, zero, half, both = (c.row(f"mix {m}") for m in
                             ("curious=1", "curious=0", "curious=0.5", "curious=0.5,confident=0.5"))
    # At weight 1 a version is the plain apply: the same KL as its encoding's row, and its bytes.
    assert one.kl == c.row("delta int4").kl and one.top1 == c.row("delta int4").top1
    assert one.bytes == store.resolve("curious").bytes and one.kind == "mix"
    # At weight 0, the base: the reference row's KL.
    assert zero.kl == c.row("base (nothing kept)").kl
    assert one.kl < half.kl < zero.kl
    assert both.bytes > one.bytes and both.kl > 0
    # The command line takes the same rows, from the store.
    runner = CliRunner()
    out = runner.invoke(cli, ["--store", str(tmp_path / "store"), "compare", str(base), str(ft), "--encodings",
                              "int4", "--ranks", "", "--full", "", "--mix", "curious=1", "--mix",
                              "curious=0.5,confident=0.5", "--prompts", str(prompts), "--json"])
    assert out.exit_code == 0, out.output
    rows = {r["label"]: r for r in json.loads(out.stdout)["rows"]}
    assert rows["mix curious=1"]["kl"] == pytest.approx(one.kl, rel=1e-6)
    assert rows["mix curious=0.5,confident=0.5"]["bytes"] == both.bytes
    bad = runner.invoke(cli, ["--store", str(tmp_path / "store"), "compare", str(base), str(ft), "--mix", "curious"])
    assert bad.exit_code == 2 and "REF=WEIGHT" in bad.output
    unknown = runner.invoke(cli, ["--store", str(tmp_path / "store"), "compare", str(base), str(ft),
                                  "--mix", "nobody=1"])
    assert unknown.exit_code == 1 and "nobody" in unknown.output and "Traceback" not in unknown.output
    with pytest.raises(CompareError, match="store"):
        compare(base, ft, encodings=(), ranks=(), full=(), mixes=[{"curious": 1.0}])


def test_against_rows_are_what_commit_against_stores(tmp_path, adam_pair):
    base, ft, prompts = adam_pair
    store = Store.init(tmp_path / "store")
    other = pair(tmp_path, low_rank(2), seed=0)[1]  # another fine-tune of the same base
    store.commit("other", other, base=str(base))
    c = compare(base, ft, encodings=("lossless", "int4"), ranks=(), full=(), prompts=prompts, store=store,
                against=["other"])
    lossless, int4 = c.row("against other@1, lossless"), c.row("against other@1, int4")
    assert lossless.kind == "against" and lossless.kl == 0.0 and 0 < int4.kl < c.row("base (nothing kept)").kl
    for row, spec in ((lossless, "lossless"), (int4, "int4")):
        r = store.commit(f"chained-{spec}", ft, base=str(base), encoding=spec, against="other", new_stance=True)
        assert row.bytes == r.bytes_stored and row.tensors == r.tensors_stored, spec
    out = CliRunner().invoke(cli, ["--store", str(tmp_path / "store"), "compare", str(base), str(ft), "--encodings",
                                   "int4", "--ranks", "", "--full", "", "--against", "other", "--json"])
    assert out.exit_code == 0, out.output
    assert [r["bytes"] for r in json.loads(out.stdout)["rows"] if r["kind"] == "against"] == [int4.bytes]


def test_auto_within_max_bytes_picks_the_lowest_kl_that_fits(adam_pair):
    base, ft, prompts = adam_pair
    every = choose_encoding(base, ft, prompts=prompts, max_kl=0.0)  # sizes every candidate
    sized = {r.spec: r.bytes for r in every.candidates if "skipped" not in r.note}
    lossy = sorted(b for s, b in sized.items() if s != "lossless")
    bound = lossy[len(lossy) // 2]
    choice = choose_encoding(base, ft, prompts=prompts, max_kl=None, max_bytes=bound)
    assert choice.bytes <= bound and choice.max_bytes == bound
    fitting = {r.spec: r for r in choice.candidates if r.kl is not None}
    assert set(fitting) == {s for s, b in sized.items() if b <= bound}  # each one measured
    assert choice.kl == min(r.kl for r in fitting.values())
    assert all("above --max-bytes" in r.note for r in choice.candidates if r.spec in sized and sized[r.spec] > bound)
    # With --max-kl too: the smallest within both.
    loose = max(r.kl for r in fitting.values())
    both = choose_encoding(base, ft, prompts=prompts, max_kl=loose, max_bytes=bound)
    assert both.bytes == min(r.bytes for r in fitting.values() if r.kl <= loose)
    with pytest.raises(CompareError, match=r"no encoding fits in --max-bytes 10 B: the smallest is"):
        choose_encoding(base, ft, prompts=prompts, max_kl=None, max_bytes=10)
    with pytest.raises(CompareError, match=r"within --max-bytes .* keeps KL at most 0"):
        choose_encoding(base, ft, prompts=prompts, max_kl=0.0, max_bytes=bound)


def test_commit_auto_max_bytes_on_the_command_line(tmp_path, adam_pair):
    base, ft, prompts = adam_pair
    store = tmp_path / "store"
    runner = CliRunner()
    assert runner.invoke(cli, ["init", str(store)]).exit_code == 0
    args = ["--store", str(store), "commit", "s", str(ft), "--base", str(base), "--prompts", str(prompts)]
    done = runner.invoke(cli, [*args, "--encoding", "auto", "--max-bytes", "20kB", "--json"])
    assert done.exit_code == 0, done.output
    out = json.loads(done.stdout)
    assert out["bytes_stored"] <= 20_000 and out["max_bytes"] == 20_000
    shown = json.loads(runner.invoke(cli, ["--store", str(store), "show", "s@1", "--json"]).stdout)
    assert shown["metadata"]["fidelity.max_bytes"] == "20000"
    for bad, said in ((["--encoding", "auto", "--max-bytes", "12 parsecs"], "is not a size"),
                      (["--encoding", "int4", "--max-bytes", "20kB"], "--encoding auto")):
        refused = runner.invoke(cli, [*args, *bad])
        assert refused.exit_code in (1, 2) and said in refused.output and "Traceback" not in refused.output
    assert [r["number"] for r in json.loads(runner.invoke(cli, ["--store", str(store), "log", "--json"]).stdout)] == [1]


def test_the_frontier_holds_the_rows_nothing_beats(adam_comparison):
    c = adam_comparison
    best = c.frontier
    measured = [r for r in c.rows if r.kl is not None and r.bytes > 0]
    assert best and [r.bytes for r in best] == sorted(r.bytes for r in best)
    for row in measured:
        beaten = any(o.bytes <= row.bytes and o.kl < row.kl or o.bytes < row.bytes and o.kl <= row.kl
                     for o in measured)
        assert (row in best) != beaten, row.label
    assert c.row("base (nothing kept)") not in best
