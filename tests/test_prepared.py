"""Prepared stances: verified and decoded once, switched into a module by a copy or a decode,
exactly revertible; and what the process remembers of a checked tensor (checked.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import deltastore.patching.apply as apply_module
import deltastore.patching.prepared as prepared_module
from deltastore import BaseMismatch, CorruptObject, DeltastoreError, Store
from deltastore.core import checked

from helpers import finetune_, make_model, module_snapshot, saved_state, write_folder

ENCODINGS = ["lossless", "int4", "int8", "1bit"]


@pytest.fixture
def store(tmp_path):
    with Store.init(tmp_path / "store") as s:
        yield s


def two_stances(tmp_path, store, dtype=torch.bfloat16, encoding="lossless"):
    """A base and stances `a` and `b` of it (b moves other weights than a), committed."""
    pair = make_model(tmp_path, dtype, name="a")
    b_module = copy.deepcopy(pair.base_module)
    finetune_(b_module, seed=77)
    store.commit("a", pair.ft, base=pair.base, encoding=encoding)
    store.commit("b", write_folder(tmp_path / "b-ft", saved_state(b_module)), base=pair.base, encoding=encoding)
    return pair, b_module


def applied_bytes(store, model, ref):
    with store.applied(model, ref):
        return module_snapshot(model)


@pytest.mark.parametrize("mode", ["full", "packed"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_switching_prepared_stances_gives_what_apply_gives_and_reverts_exactly(tmp_path, store, mode,
                                                                               encoding) -> None:
    pair, _ = two_stances(tmp_path, store, encoding=encoding)
    model = copy.deepcopy(pair.base_module)
    base = module_snapshot(model)
    expected = {ref: applied_bytes(store, model, ref) for ref in ("a", "b")}
    assert expected["a"] != base and expected["b"] != base and expected["a"] != expected["b"]

    a, b = store.prepare("a", mode=mode), store.prepare("b", mode=mode)
    assert a.mode == mode and a.nbytes > 0
    for ref, stance in [("a", a), ("b", b), ("a", a), ("a", a), ("b", b)]:
        handle = store.switch(model, stance)
        assert handle.version.stance == ref
        assert module_snapshot(model) == expected[ref]
    assert store.switch(model, None) is None
    assert module_snapshot(model) == base
    store.switch(model, a)
    store.revert(model)
    assert module_snapshot(model) == base
    # Nothing is left registered: a plain apply works after it.
    assert applied_bytes(store, model, "b") == expected["b"]


def test_packed_holds_about_the_stored_bytes_and_full_the_touched_bytes(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.bfloat16)
    version = store.commit("s", pair.ft, base=pair.base, encoding="int4").version
    touched = sum(t.numel() * t.element_size() for n, t in pair.ft_state.items() if n in pair.changed)
    full, packed = store.prepare("s"), store.prepare("s", mode="packed")
    assert full.nbytes == touched
    stored_raw = sum(o.size for e in version.tensors for o in e.objects.values())
    # The parts as decompressed (a lossless entry among them: its compressed file).
    assert 0.8 * stored_raw <= packed.nbytes <= 1.25 * stored_raw
    assert packed.nbytes < touched / 3


def test_a_switch_between_prepared_stances_hashes_nothing(tmp_path, store, monkeypatch) -> None:
    pair, _ = two_stances(tmp_path, store)
    a, b = store.prepare("a"), store.prepare("b")
    model = copy.deepcopy(pair.base_module)
    store.switch(model, a)  # the first switch checks the base: hashes each tensor once
    hashed = []
    real = prepared_module.tensor_id
    monkeypatch.setattr(prepared_module, "tensor_id", lambda t: hashed.append(t) or real(t))
    store.switch(model, b)
    store.switch(model, a)
    store.switch(model, None)
    assert hashed == []


def test_prepare_refuses_a_corrupt_object_and_a_switch_never_reads_the_store(tmp_path, store) -> None:
    pair, _ = two_stances(tmp_path, store)
    a = store.prepare("a", mode="packed")
    for entry in store.resolve("a").tensors:
        path = store.objects.path(entry.objects["xor"].id)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    with pytest.raises(CorruptObject):
        store.prepare("a")
    model = copy.deepcopy(pair.base_module)
    store.switch(model, a)
    assert module_snapshot(model) == module_snapshot(pair.ft_module)


def test_a_module_that_is_not_the_base_is_refused_and_left_alone(tmp_path, store) -> None:
    pair, _ = two_stances(tmp_path, store)
    a = store.prepare("a")
    model = copy.deepcopy(pair.base_module)
    with torch.no_grad():
        model.blocks[1].mlp.weight[0, 0] += 1
    before = module_snapshot(model)
    with pytest.raises(BaseMismatch) as e:
        store.switch(model, a)
    assert e.value.names == ["blocks.1.mlp.weight"]
    assert module_snapshot(model) == before


def test_a_module_changed_between_switches_is_refused_and_left_alone(tmp_path, store) -> None:
    pair, _ = two_stances(tmp_path, store)
    a, b = store.prepare("a"), store.prepare("b")
    model = copy.deepcopy(pair.base_module)
    store.switch(model, a)
    with torch.no_grad():
        model.blocks[1].mlp.weight.mul_(1.5)  # an optimizer step, say
    before = module_snapshot(model)
    with pytest.raises(DeltastoreError, match="changed since the last switch"):
        store.switch(model, b)
    assert module_snapshot(model) == before
    # Revert still puts the exact base back.
    store.revert(model)
    assert module_snapshot(model) == module_snapshot(pair.base_module)


def test_a_failure_while_switching_puts_the_previous_stance_back(tmp_path, store, monkeypatch) -> None:
    pair, _ = two_stances(tmp_path, store)
    a, b = store.prepare("a"), store.prepare("b")
    model = copy.deepcopy(pair.base_module)
    store.switch(model, a)
    held = module_snapshot(model)
    real = prepared_module._write_one
    calls = []

    def failing(t, p, base):
        calls.append(p)
        if len(calls) == 3:
            raise MemoryError("out of memory")
        real(t, p, base)

    monkeypatch.setattr(prepared_module, "_write_one", failing)
    with pytest.raises(MemoryError):
        store.switch(model, b)
    assert module_snapshot(model) == held
    monkeypatch.setattr(prepared_module, "_write_one", real)
    store.switch(model, None)
    assert module_snapshot(model) == module_snapshot(pair.base_module)


def test_a_plain_apply_is_reverted_before_a_prepared_switch(tmp_path, store) -> None:
    pair, b_module = two_stances(tmp_path, store)
    b = store.prepare("b", mode="packed")
    model = copy.deepcopy(pair.base_module)
    store.apply(model, "a")
    store.switch(model, b)
    assert module_snapshot(model) == module_snapshot(b_module)
    store.switch(model, "a")  # by ref again: the prepared switch is reverted first
    assert module_snapshot(model) == module_snapshot(pair.ft_module)
    store.revert(model)
    assert module_snapshot(model) == module_snapshot(pair.base_module)


def test_prepare_takes_the_base_from_a_module_and_refuses_an_unknown_mode(tmp_path, store) -> None:
    pair, _ = two_stances(tmp_path, store)
    model = copy.deepcopy(pair.base_module)
    a = store.prepare("a", base_weights=model)
    store.switch(model, a)
    assert module_snapshot(model) == module_snapshot(pair.ft_module)
    with pytest.raises(DeltastoreError, match="unknown prepare mode"):
        store.prepare("a", mode="zipped")


def test_prepared_stances_switch_on_a_cuda_module(tmp_path, store) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU: no CUDA device here")
    pair, b_module = two_stances(tmp_path, store)
    store.commit("b4", write_folder(tmp_path / "b4", saved_state(b_module)), base=pair.base, encoding="int4")
    cpu = copy.deepcopy(pair.base_module)
    expected = applied_bytes(store, cpu, "b4")
    model = copy.deepcopy(pair.base_module).cuda()
    base = module_snapshot(model)
    stances = {(ref, mode): store.prepare(ref, device="cuda", mode=mode)
               for ref in ("a", "b4") for mode in ("full", "packed")}
    for (ref, mode), stance in stances.items():
        store.switch(model, stance)
        assert all(p.device.type == "cuda" for p in model.parameters())
        if ref == "a":
            assert module_snapshot(model) == module_snapshot(pair.ft_module)
        else:
            assert module_snapshot(model) == expected
    store.revert(model)
    assert module_snapshot(model) == base
    with pytest.raises(DeltastoreError, match="prepared on cpu"):
        store.switch(model, store.prepare("a"))


# -- what the process remembers of a checked tensor ----------------------------------------------


def test_a_base_checked_once_is_not_hashed_again_until_it_changes(tmp_path, store, monkeypatch) -> None:
    pair = make_model(tmp_path, torch.bfloat16)
    store.commit("s", pair.ft, base=pair.base)
    model = copy.deepcopy(pair.base_module)
    hashed = []
    real = apply_module.tensor_id
    monkeypatch.setattr(apply_module, "tensor_id", lambda t: hashed.append(t) or real(t))
    with store.applied(model, "s"):
        pass
    first = len(hashed)
    assert first > 0
    hashed.clear()
    with store.applied(model, "s"):  # the revert wrote the base, of known id
        pass
    assert hashed == []
    # Changed by torch, or behind its back through .data: checked again, and refused.
    for change in (lambda w: w.add_(1), lambda w: w.data.copy_(torch.randn_like(w))):
        with torch.no_grad():
            change(model.blocks[1].mlp.weight)
        with pytest.raises(BaseMismatch, match="blocks.1.mlp.weight"):
            store.apply(model, "s")
        model.blocks[1].mlp.weight.data.copy_(pair.base_module.blocks[1].mlp.weight)


def test_checked_forgets_a_tensor_whose_storage_changed() -> None:
    t = torch.randn(1000)
    checked.remember(t, "b3:x")
    assert checked.known_id(t) == "b3:x"
    t.data = torch.randn(1000)
    assert checked.known_id(t) is None
    u = torch.randn(10, 10)
    checked.remember(u, "b3:y")
    u.numpy()[3, 3] += 1  # no version bump; the sample covers all of a small tensor
    assert checked.known_id(u) is None


def test_a_revert_gives_its_buffers_to_the_next_apply_and_every_byte_stays_exact(tmp_path, store) -> None:
    from deltastore.core import spare

    pair, b_module = two_stances(tmp_path, store)
    store.commit("a4", pair.ft, base=pair.base, encoding="int4")
    model = copy.deepcopy(pair.base_module)
    base = module_snapshot(model)
    spare.release()
    with store.applied(model, "a"):
        pass
    given = spare.held_bytes()
    assert given > 0
    for ref, expected in [("b", module_snapshot(b_module)), ("a", module_snapshot(pair.ft_module))]:
        handle = store.apply(model, ref)
        assert module_snapshot(model) == expected
        handle.revert()
        assert module_snapshot(model) == base
    with store.applied(model, "a4"):
        assert spare.held_bytes() < given
    spare.limit(0)
    assert spare.held_bytes() == 0
    spare.limit(2 << 30)
