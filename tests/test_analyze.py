"""analyze: per (layer, module kind), what the tensors a version applies changed against its base,
for versions of any encoding; the table, the JSON and the heatmap."""

import json

import pytest

pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from cli.main import cli  # noqa: E402
from deltastore import RefNotFound, Store  # noqa: E402
from deltastore.compare import analyze, analyze_plot  # noqa: E402
from tiny_lm import adam_like, only, pair  # noqa: E402

V_PROJ = r"layers\.1\.self_attn\.v_proj\.weight"


@pytest.fixture(scope="module")
def surgical(tmp_path_factory):
    """A store with one fine-tune that moved only layer 1's v_proj, as lossless and as int4."""
    tmp = tmp_path_factory.mktemp("surgical")
    base, ft = pair(tmp, only(V_PROJ, adam_like(0.05)))
    store = Store.init(tmp / "store")
    store.commit("surgical", ft, base=str(base), encoding="lossless")
    store.commit("surgical", ft, base=str(base), encoding="int4")
    store.close()
    return tmp / "store", base, ft


def test_a_fine_tune_of_one_v_proj_shows_exactly_that_cell(surgical):
    root, _, _ = surgical
    with Store.open(root) as store:
        results = analyze(store, ["surgical@1", "surgical@2"])
    assert [a.ref for a in results] == ["surgical@1", "surgical@2"]
    assert [a.encoding for a in results] == ["lossless", "int4"]
    for a in results:
        changed = [(row.layer, row.module) for row in a.rows if row.rel_change > 0]
        assert changed == [(1, "v")]
        cell = next(row for row in a.rows if (row.layer, row.module) == (1, "v"))
        assert cell.energy_share == pytest.approx(1.0)
        assert cell.rel_change == pytest.approx(0.05, rel=0.3)
        assert 0 < cell.rank90 <= cell.rank99 <= 16  # v_proj is 16 x 32
        assert len(cell.singular_values) == 5 and cell.singular_values[0] == cell.top_singular
        # Every other cell is there, unchanged (grey in the heatmap).
        assert all(row.energy == 0.0 for row in a.rows if (row.layer, row.module) != (1, "v"))
        assert {(row.layer, row.module) for row in a.rows} >= {(0, "q"), (1, "down"), (None, "embed")}
    # int4 applies a slightly different tensor: the analysis sees what apply produces.
    lossless, int4 = (next(r for r in a.rows if r.module == "v" and r.layer == 1) for a in results)
    assert int4.rel_change != lossless.rel_change
    assert int4.rel_change == pytest.approx(lossless.rel_change, rel=0.05)


def test_heatmap_one_panel_per_ref(tmp_path, surgical):
    root, _, _ = surgical
    with Store.open(root) as store:
        out = analyze_plot(analyze(store, ["surgical@1", "surgical@2"]), tmp_path / "a.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_analyze_on_the_command_line(tmp_path, surgical):
    root, _, _ = surgical
    runner = CliRunner()
    png = tmp_path / "analyze.png"
    result = runner.invoke(cli, ["--store", str(root), "analyze", "surgical@1", "surgical", "--plot", str(png),
                                 "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["plot"] == str(png) and png.stat().st_size > 5_000
    assert [r["ref"] for r in data["refs"]] == ["surgical@1", "surgical@2"]
    for ref in data["refs"]:
        changed = [(row["layer"], row["module"]) for row in ref["rows"] if row["rel_change"] > 0]
        assert changed == [(1, "v")]
    text = runner.invoke(cli, ["--store", str(root), "analyze", "surgical@2"])
    assert text.exit_code == 0
    lines = text.output.splitlines()
    assert lines[0].startswith("surgical@2 (int4, 1 tensors stored): 1 of ")
    assert lines[2].split()[:2] == ["1", "v"] and len(lines) == 3
    everything = runner.invoke(cli, ["--store", str(root), "analyze", "surgical@2", "--all"])
    assert len(everything.output.splitlines()) > 10
    missing = runner.invoke(cli, ["--store", str(root), "analyze", "nothing-here"])
    assert missing.exit_code == 1 and "no version matches" in missing.output


def test_a_dense_fine_tune_changes_every_cell(tmp_path):
    base, ft = pair(tmp_path, adam_like(0.01))
    with Store.init(tmp_path / "store") as store:
        store.commit("dense", ft, base=str(base), encoding="int8")
        (a,) = analyze(store, ["dense"])
        with pytest.raises(RefNotFound):
            analyze(store, ["dense@7"])
    assert all(row.rel_change > 0 for row in a.rows)
    assert sum(row.energy_share for row in a.rows) == pytest.approx(1.0)
    norms = [row for row in a.rows if row.module == "norm"]
    assert norms and all(row.rank90 is None for row in norms)


def test_spectrum_of_one_tensor(tmp_path, surgical):
    root, _, _ = surgical
    runner = CliRunner()
    name = "model.layers.1.self_attn.v_proj.weight"
    png = tmp_path / "spectrum.png"
    result = runner.invoke(cli, ["--store", str(root), "analyze", "surgical@1", "surgical@2", "--spectrum", name,
                                 "--plot", str(png), "--json"])
    assert result.exit_code == 0, result.output
    spectra = json.loads(result.stdout)["spectra"]
    assert [s["ref"] for s in spectra] == ["surgical@1", "surgical@2"]
    for s in spectra:
        assert len(s["base"]) == len(s["tuned"]) == len(s["delta"]) == 16
        assert s["delta"][0] > 0 and s["delta"] == sorted(s["delta"], reverse=True)
    assert spectra[0]["base"] == spectra[1]["base"] and png.read_bytes()[:4] == b"\x89PNG"
    # An unchanged tensor's delta has no spectrum above zero.
    other = runner.invoke(cli, ["--store", str(root), "analyze", "surgical@1", "--spectrum",
                                "model.layers.0.self_attn.q_proj.weight", "--json"])
    assert max(json.loads(other.stdout)["spectra"][0]["delta"]) == 0.0
    missing = runner.invoke(cli, ["--store", str(root), "analyze", "surgical@1", "--spectrum", "v_proj"])
    assert missing.exit_code == 1 and "did you mean" in missing.output
    norm = runner.invoke(cli, ["--store", str(root), "analyze", "surgical@1", "--spectrum", "model.norm.weight"])
    assert norm.exit_code == 1 and "no spectrum" in norm.output
