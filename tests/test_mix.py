"""Versions at any strength and mixed, on a live module and into a new folder:
base + a*dW1 + b*dW2, rounded once; scale 0 is the base and scale 1 the plain apply, bit for bit;
revert puts the exact base bytes back after each."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from deltastore import Store
from deltastore.core.errors import BaseMismatch
from deltastore.patching.mix import MixError

from helpers import finetune_, load_folder, make_model, module_snapshot, raw, saved_state, write_folder


@pytest.fixture(params=["float32", "bfloat16"])
def two(request, tmp_path):
    """A base, two fine-tunes of it (lossless and int4) in a store, and the fine-tuned states."""
    dtype = getattr(torch, request.param)
    pair = make_model(tmp_path, dtype)
    other = copy.deepcopy(pair.base_module)
    finetune_(other, seed=77)
    other_dir = write_folder(tmp_path / "other-ft", saved_state(other))
    store = Store.init(tmp_path / "store")
    store.commit("a", pair.ft, base=pair.base)
    store.commit("b", other_dir, base=pair.base, encoding="int4")
    yield store, pair
    store.close()


def _expected(base: dict[str, torch.Tensor], parts: list[tuple[float, dict[str, torch.Tensor]]]) -> dict:
    """base + (a*(r_a - base) + b*(r_b - base)) in float64, rounded once: computed here from the
    versions' results as export writes them, independently of mix.py."""
    out = {}
    for name, b in base.items():
        b64 = b.double()
        delta = torch.zeros_like(b64)
        for weight, result in parts:
            delta += weight * (result[name].double() - b64)
        out[name] = (b64 + delta).to(b.dtype)
    return out


def _state(module: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    return {n: state[n].detach().clone() for n in names}


def test_scale_zero_is_the_base_and_scale_one_the_plain_apply(two):
    store, pair = two
    model = copy.deepcopy(pair.base_module)
    base = module_snapshot(model)
    for ref in ("a", "b"):
        handle = store.apply(model, ref, scale=0.0)
        assert module_snapshot(model) == base
        handle.revert()
        plain = store.apply(model, ref)
        applied = module_snapshot(model)
        plain.revert()
        assert module_snapshot(model) == base
        with store.applied(model, ref, scale=1.0):
            assert module_snapshot(model) == applied
        assert module_snapshot(model) == base
        with store.applied(model, {ref: 1}):
            assert module_snapshot(model) == applied
        assert module_snapshot(model) == base


def test_a_mix_is_base_plus_weighted_deltas_rounded_once(two, tmp_path):
    store, pair = two
    model = copy.deepcopy(pair.base_module)
    snapshot = module_snapshot(model)
    base = pair.base_state
    results = {ref: dict(store.tensors(ref)) for ref in ("a", "b")}
    for weights in ({"a": 0.5}, {"a": -1.0}, {"a": 2.5}, {"a": 0.5, "b": 0.5}, {"a": 1.0, "b": -0.3},
                    {"b": 0.25, "a": 0.75}):
        expected = _expected(base, [(w, results[ref]) for ref, w in weights.items()])
        if len(weights) == 1:
            [(ref, scale)] = weights.items()
            handle = store.apply(model, ref, scale=scale)
        else:
            handle = store.apply(model, weights)
        got = _state(model, base)
        assert {n: raw(t) for n, t in got.items()} == {n: raw(t) for n, t in expected.items()}
        handle.revert()
        assert module_snapshot(model) == snapshot
    # Half of a stance moves every changed weight, and not all the way.
    with store.applied(model, "a", scale=0.5):
        half = _state(model, base)
    changed = [n for n in base if not torch.equal(base[n], results["a"][n])]
    assert changed and any(not torch.equal(half[n], base[n]) for n in changed)


def test_a_mix_refuses_before_it_writes(two, tmp_path):
    store, pair = two
    model = copy.deepcopy(pair.base_module)
    snapshot = module_snapshot(model)
    with pytest.raises(MixError, match="finite"):
        store.apply(model, "a", scale=float("nan"))
    with pytest.raises(MixError, match="twice"):
        store.apply(model, {"a": 0.5, "a@1": 0.5})
    with pytest.raises(MixError, match="not both"):
        store.apply(model, {"a": 0.5}, scale=2)
    assert module_snapshot(model) == snapshot
    # A model that is not at its base (another stance applied) is refused, untouched.
    with store.applied(model, "b"):
        moved = module_snapshot(model)
        with pytest.raises(BaseMismatch):
            store.apply(model, {"a": 0.5, "b": 0.5})
        assert module_snapshot(model) == moved
    assert module_snapshot(model) == snapshot


def test_export_mix_writes_the_mixed_model(two, tmp_path):
    store, pair = two
    root = store.root
    store.close()
    runner = CliRunner()
    out = tmp_path / "mixed"
    result = runner.invoke(cli, ["--store", str(root), "export", "--mix", "a=0.5,b=0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Store.open(root) as store:
        results = {ref: dict(store.tensors(ref)) for ref in ("a", "b")}
    expected = _expected(pair.base_state, [(0.5, results["a"]), (0.5, results["b"])])
    written = load_folder(out)
    assert sorted(written) == sorted(expected)
    assert all(torch.equal(written[n], expected[n]) for n in expected)
    assert (out / "config.json").exists() == (pair.base / "config.json").exists()
    # The live model mixed the same way holds the same tensors.
    with Store.open(root) as store:
        model = copy.deepcopy(pair.base_module)
        with store.applied(model, {"a": 0.5, "b": 0.5}):
            assert all(torch.equal(t, written[n]) for n, t in _state(model, written).items())
    bad = runner.invoke(cli, ["--store", str(root), "export", "--mix", "a=half", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--mix" in bad.stderr and not (tmp_path / "x").exists()
    both = runner.invoke(cli, ["--store", str(root), "export", "a", "--mix", "a=1", "--out", str(tmp_path / "y")])
    assert both.exit_code == 2 and not (tmp_path / "y").exists()
    scaled = runner.invoke(cli, ["--store", str(root), "apply", "a", str(pair.base), "--scale", "0.5"])
    assert scaled.exit_code == 1 and "export --mix" in scaled.stderr and "Traceback" not in scaled.output
