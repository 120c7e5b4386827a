"""analyze --similarity: two stances built from a known shared component and known private parts
come out as built (cosines and energy shares within 1e-6), per (layer, module) and over the whole
model; the heatmap's cells are those cosines; the command line's table, JSON and errors."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from cli.main import cli
from deltastore import Store
from deltastore.core.errors import AnalysisError
from deltastore.analysis.plots import similarity_grids, similarity_plot
from deltastore.analysis.similarity import overlap, similarity

Q0, DOWN0 = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"
Q1, V1 = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"
EMBED, NORM = "model.embed_tokens.weight", "model.norm.weight"


def _quarters(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Nonzero multiples of 1/4 in [-2, 2]: base + delta is exact in float32, so the deltas apply
    produces are exactly the parts built."""
    values = torch.randint(1, 9, shape, generator=gen).float() / 4
    signs = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
    return values * signs


def _masked(part: torch.Tensor, rows: slice) -> torch.Tensor:
    out = torch.zeros_like(part)
    out[rows] = part[rows]
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A base and two stances: per tensor, delta 1 = shared + private 1, delta 2 = shared + private 2
    (or its negation), with shared and the privates on disjoint rows, so mutually orthogonal."""
    tmp = tmp_path_factory.mktemp("similarity")
    gen = torch.Generator().manual_seed(7)
    shapes = {Q0: (8, 8), DOWN0: (8, 16), Q1: (8, 8), V1: (12, 8), EMBED: (20, 8), NORM: (8,)}
    base = {name: torch.randint(-8, 9, shape, generator=gen).float() for name, shape in shapes.items()}
    top, middle, bottom = slice(0, 4), slice(4, 8), slice(8, 12)
    delta1: dict[str, torch.Tensor] = {}
    delta2: dict[str, torch.Tensor] = {}
    # q of layer 0: the shared part only, the same in both (cosine 1).
    shared = _quarters(gen, shapes[Q0])
    delta1[Q0], delta2[Q0] = shared, shared.clone()
    # down of layer 0: private parts only, on disjoint rows (cosine 0).
    part = _quarters(gen, shapes[DOWN0])
    delta1[DOWN0], delta2[DOWN0] = _masked(part, top), _masked(-part.flip(0), middle)
    # q of layer 1: opposite directions (cosine -1).
    delta1[Q1] = _quarters(gen, shapes[Q1])
    delta2[Q1] = -delta1[Q1]
    # v of layer 1: shared on the top rows, each its own private part below (cosine between).
    part = _quarters(gen, shapes[V1])
    delta1[V1] = _masked(part, top) + _masked(part, middle)
    delta2[V1] = _masked(part, top) + 2 * _masked(_quarters(gen, shapes[V1]), bottom)
    # The embedding: only stance 1 moved it (no cosine there); the norm: neither.
    delta1[EMBED] = _quarters(gen, shapes[EMBED])
    delta2[EMBED] = torch.zeros(shapes[EMBED])
    delta1[NORM] = delta2[NORM] = torch.zeros(shapes[NORM])
    save_file(base, str(tmp / "base.safetensors"))
    for k, delta in ((1, delta1), (2, delta2)):
        save_file({n: base[n] + delta[n] for n in base}, str(tmp / f"ft{k}.safetensors"))
    store = Store.init(tmp / "store")
    store.add_base(str(tmp / "base.safetensors"), name="base")
    store.commit("one", str(tmp / "ft1.safetensors"), base="base")
    store.commit("two", str(tmp / "ft2.safetensors"), base="base")
    store.commit("two", str(tmp / "ft2.safetensors"), base="base", encoding="int4")
    store.close()
    return tmp, delta1, delta2


def _expected(deltas: list[list[torch.Tensor]]) -> tuple[float | None, list[float | None]]:
    """Cosine of the two deltas and each one's share along their mean, from the parts as built,
    in numpy float64: an independent computation."""
    flat = [np.concatenate([t.double().numpy().ravel() for t in tensors]) for tensors in deltas]
    mean = sum(flat) / len(flat)
    norms = [float(np.linalg.norm(f)) for f in flat]
    cosine = None if 0.0 in norms else float(flat[0] @ flat[1]) / (norms[0] * norms[1])
    # Deltas that cancel share no direction: all their energy is their own.
    shares = [None if n == 0.0 else 0.0 if float(mean @ mean) == 0.0 else
              float(f @ mean) ** 2 / (float(mean @ mean) * n * n) for f, n in zip(flat, norms)]
    return cosine, shares


def test_the_cosines_and_shares_come_out_as_built(built):
    tmp, delta1, delta2 = built
    with Store.open(tmp / "store") as store:
        found = similarity(store, ["one", "two@1"])
    assert found.refs == ("one@1", "two@1") and found.pairs == ((0, 1),) and found.skipped == ()
    rows = {(r.layer, r.module): r for r in found.rows}
    assert list(rows) == [(None, "embed"), (0, "q"), (0, "down"), (1, "q"), (1, "v")]  # the norm changed nowhere
    assert rows[(0, "q")].cosine[0] == pytest.approx(1.0, abs=1e-6)
    assert rows[(0, "down")].cosine[0] == pytest.approx(0.0, abs=1e-6)
    assert rows[(1, "q")].cosine[0] == pytest.approx(-1.0, abs=1e-6)
    assert rows[(None, "embed")].cosine == (None,) and rows[(None, "embed")].shared[1] is None
    # v of layer 1 by its parts' energies: S shared, P1 and P2 private, all orthogonal.
    energy = {name: float((t.double() ** 2).sum()) for name, t in {
        "S": _masked(delta1[V1], slice(0, 4)), "P1": _masked(delta1[V1], slice(4, 8)),
        "P2": _masked(delta2[V1], slice(8, 12))}.items()}
    s, p1, p2 = energy["S"], energy["P1"], energy["P2"]
    v = rows[(1, "v")]
    assert v.cosine[0] == pytest.approx(s / math.sqrt((s + p1) * (s + p2)), abs=1e-6)
    mean = s + (p1 + p2) / 4
    assert v.shared[0] == pytest.approx((s + p1 / 2) ** 2 / ((s + p1) * mean), abs=1e-6)
    assert v.shared[1] == pytest.approx((s + p2 / 2) ** 2 / ((s + p2) * mean), abs=1e-6)
    assert v.own[0] == pytest.approx(1 - v.shared[0], abs=1e-12)
    assert v.energy == pytest.approx((s + p1, s + p2), rel=1e-12)
    # Every cell and the whole model against the independent computation.
    cells = {(None, "embed"): [EMBED], (0, "q"): [Q0], (0, "down"): [DOWN0], (1, "q"): [Q1], (1, "v"): [V1]}
    for key, names in [*cells.items(), (None, [EMBED, Q0, DOWN0, Q1, V1])]:
        got = rows[key] if key is not None else found.model
        cosine, shares = _expected([[delta1[n] for n in names], [delta2[n] for n in names]])
        assert (got.cosine[0] is None) == (cosine is None)
        if cosine is not None:
            assert got.cosine[0] == pytest.approx(cosine, abs=1e-6)
        for share, want in zip(got.shared, shares):
            assert (share is None) == (want is None)
            if want is not None:
                assert share == pytest.approx(want, abs=1e-6)
    assert found.model.tensors == 5


def test_lossy_versions_are_compared_as_apply_produces_them(built):
    tmp, delta1, _ = built
    with Store.open(tmp / "store") as store:
        found = similarity(store, ["one", "two@2"])  # two@2 is int4: not exactly the parts built
        base = dict(store.tensors("one@1"))
        applied = {name: t - delta1[name] for name, t in base.items()}  # the base itself
        int4 = dict(store.tensors("two@2"))
    names = [EMBED, Q0, DOWN0, Q1, V1]
    cosine, shares = _expected([[delta1[n] for n in names], [int4[n] - applied[n] for n in names]])
    assert found.model.cosine[0] == pytest.approx(cosine, abs=1e-6)
    assert list(found.model.shared) == pytest.approx(shares, abs=1e-6)


def test_three_refs_make_three_pairs_and_share_one_mean():
    # Three deltas e1, e1, e2 (unit vectors): the mean is (2 e1 + e2) / 3.
    found = overlap([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert found.cosine == (1.0, 0.0, 0.0)
    assert found.shared == pytest.approx((0.8, 0.8, 0.2))
    assert found.own == pytest.approx((0.2, 0.2, 0.8))
    # Deltas that cancel share no direction; a zero delta has no share.
    assert overlap([[1.0, -1.0], [-1.0, 1.0]]).shared == (0.0, 0.0)
    assert overlap([[1.0, 0.0], [0.0, 0.0]]).shared == (1.0, None)


def test_the_heatmap_marks_the_cells_as_built(tmp_path, built):
    tmp, _, _ = built
    with Store.open(tmp / "store") as store:
        found = similarity(store, ["one", "two@1"])
    layers, modules, grids = similarity_grids(found)
    assert layers == [None, 0, 1] and modules == ["embed", "q", "v", "down"]
    grid = grids["one@1 vs two@1"]
    cell = {(layer, module): grid[layers.index(layer), modules.index(module)]
            for layer in layers for module in modules}
    assert cell[(0, "q")] == pytest.approx(1.0) and cell[(1, "q")] == pytest.approx(-1.0)
    assert cell[(0, "down")] == pytest.approx(0.0, abs=1e-9)
    assert cell[(1, "v")] == pytest.approx(found.rows[-1].cosine[0])
    # Grey: a delta is zero there (the embedding), or no tensor (v of layer 0).
    assert math.isnan(cell[(None, "embed")]) and math.isnan(cell[(0, "v")])
    out = similarity_plot(found, tmp_path / "similarity.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_similarity_refuses_what_it_cannot_compare(built, tmp_path):
    tmp, _, _ = built
    with Store.open(tmp / "store") as store:
        with pytest.raises(AnalysisError, match="two refs or more"):
            similarity(store, ["one"])
        with pytest.raises(AnalysisError, match="same version"):
            similarity(store, ["one", "one@1"])
    other = tmp_path / "other.safetensors"
    save_file({NORM: torch.ones(8)}, str(other))
    save_file({NORM: torch.full((8,), 1.05)}, str(tmp_path / "other-ft.safetensors"))
    root = tmp_path / "store"
    with Store.init(root) as store:
        store.add_base(str(tmp / "base.safetensors"), name="base")
        store.add_base(str(other), name="other")
        store.commit("one", str(tmp / "ft1.safetensors"), base="base")
        store.commit("else", str(tmp_path / "other-ft.safetensors"), base="other")
        with pytest.raises(AnalysisError, match="one base"):
            similarity(store, ["one", "else"])


def test_analyze_similarity_on_the_command_line(tmp_path, built):
    tmp, _, _ = built
    runner = CliRunner()
    png = tmp_path / "sim.png"
    result = runner.invoke(cli, ["--store", str(tmp / "store"), "analyze", "--similarity", "one", "two@1",
                                 "--plot", str(png), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["refs"] == ["one@1", "two@1"] and data["pairs"] == [[0, 1]] and data["plot"] == str(png)
    rows = {(r["layer"], r["module"]): r for r in data["rows"]}
    assert rows[(0, "q")]["cosine"][0] == pytest.approx(1.0)
    assert rows[(None, "embed")]["cosine"] == [None]
    assert png.stat().st_size > 5_000
    text = runner.invoke(cli, ["--store", str(tmp / "store"), "analyze", "--similarity", "one", "two@1"])
    assert text.exit_code == 0, text.output
    assert "one@1 vs two@1" in text.stdout and "shared" in text.stdout and "-1.000" in text.stdout
    one = runner.invoke(cli, ["--store", str(tmp / "store"), "analyze", "--similarity", "one"])
    assert one.exit_code == 1 and "two refs or more" in one.stderr and "Traceback" not in one.output
    both = runner.invoke(cli, ["--store", str(tmp / "store"), "analyze", "--similarity", "--alpha", "one", "two"])
    assert both.exit_code == 2 and "--similarity" in both.stderr
