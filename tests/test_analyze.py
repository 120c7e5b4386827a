"""analyze: per (layer, module kind), what the tensors a version applies changed against its base,
for versions of any encoding; the table, the JSON and the heatmap."""

import json
import math
import sys

import pytest
import torch

pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from cli.main import cli  # noqa: E402
from deltastore import RefNotFound, Store  # noqa: E402
from deltastore.analysis.plots import analyze_plot  # noqa: E402
from deltastore.analysis.refanalysis import analyze  # noqa: E402
from tiny_lm import adam_like, only, pair  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

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
    assert lines[1].startswith("1 of ") and lines[1].endswith(" tensors changed; largest: layer 1 v 100.0% of the energy")
    assert lines[3].split()[:2] == ["1", "v"] and len(lines) == 4
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


# ---------------------------------------------------------------------------------------------
# --alpha: WeightWatcher's power-law alpha before and after (the optional alpha extra)

V_NAME = "model.layers.1.self_attn.v_proj.weight"
Q_NAME = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def weightwatcher():
    return pytest.importorskip("weightwatcher",
                               reason="analyze --alpha needs the alpha extra: pip install 'deltastore[alpha]'")


@pytest.fixture(scope="module")
def wide(tmp_path_factory, weightwatcher):
    """Matrices of 64 to 256 rows (enough eigenvalues for a fit); only layer 1's v_proj moved."""
    tmp = tmp_path_factory.mktemp("wide")
    base, ft = pair(tmp, only(V_PROJ, adam_like(0.5)), hidden=128)
    store = Store.init(tmp / "store")
    store.commit("wide", ft, base=str(base), encoding="lossless")
    store.close()
    return tmp / "store", base


def test_alpha_of_base_and_fine_tune(wide, weightwatcher):
    from deltastore.metrics.alpha import matrix_alpha

    root, base = wide
    with Store.open(root) as store:
        (a,) = analyze(store, ["wide"], alpha=True)
    moved = a.alphas[V_NAME]
    assert all(math.isfinite(x) and x > 0 for x in (moved.alpha_base, moved.alpha_ft))
    assert moved.alpha_shift == pytest.approx((moved.alpha_ft - moved.alpha_base) / moved.alpha_base)
    assert moved.alpha_shift != 0.0
    assert a.row_alphas[(1, "v")] == moved  # one matrix in the row
    # An unchanged tensor: the same alpha on both sides, and it is WeightWatcher's alpha of the
    # base's matrix itself.
    same = a.alphas[Q_NAME]
    assert same.alpha_base == same.alpha_ft and same.alpha_shift == 0.0
    weights = load_file(str(base / "model.safetensors"))
    assert matrix_alpha(weightwatcher, weights[Q_NAME]) == same.alpha_base
    # No fit, never an error: vectors, integers, matrices under WeightWatcher's minimum size.
    assert a.alphas["model.norm.weight"].alpha_base is None and a.row_alphas[(None, "norm")].alpha_shift is None
    assert matrix_alpha(weightwatcher, weights[Q_NAME][:4]) is None
    assert matrix_alpha(weightwatcher, weights[Q_NAME].to(torch.int32)) is None


def test_alpha_on_the_command_line(wide):
    root, _ = wide
    runner = CliRunner()
    text = runner.invoke(cli, ["--store", str(root), "analyze", "wide", "--alpha"])
    assert text.exit_code == 0, text.output
    header, row = text.output.splitlines()[2:4]
    assert header.split()[:8] == ["layer", "module", "tensors", "rel", "change", "alpha", "base", "alpha"]
    assert row.split()[:2] == ["1", "v"] and row.split()[6].endswith("%")
    data = json.loads(runner.invoke(cli, ["--store", str(root), "analyze", "wide", "--alpha", "--json"]).stdout)
    cell = next(r for r in data["refs"][0]["rows"] if (r["layer"], r["module"]) == (1, "v"))
    assert cell["alpha_shift"] == pytest.approx((cell["alpha_ft"] - cell["alpha_base"]) / cell["alpha_base"])
    assert data["refs"][0]["alpha"][Q_NAME]["alpha_shift"] == 0.0
    # Without --alpha, the output is as it always was.
    plain = json.loads(runner.invoke(cli, ["--store", str(root), "analyze", "wide", "--json"]).stdout)
    assert "alpha" not in plain["refs"][0] and "alpha_base" not in plain["refs"][0]["rows"][0]
    assert "alpha" not in runner.invoke(cli, ["--store", str(root), "analyze", "wide"]).output


def test_alpha_without_weightwatcher_says_what_to_install(tmp_path, surgical, monkeypatch):
    root, _, _ = surgical
    monkeypatch.setitem(sys.modules, "weightwatcher", None)  # import weightwatcher fails
    png = tmp_path / "never.png"
    result = CliRunner().invoke(cli, ["--store", str(root), "analyze", "surgical", "--alpha", "--plot", str(png)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: --alpha needs the weightwatcher package, which is not installed: pip install 'deltastore[alpha]'"]
    assert not png.exists()
