"""Apply on a live nn.Module, in place, and revert to the exact base bytes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deltastore import BaseMismatch, CorruptObject, Store
from deltastore.core import checked

from helpers import (finetune_, make_model, module_snapshot, object_files, raw, saved_state,
                     tiny_net, write_folder)


@pytest.fixture
def store(tmp_path):
    with Store.init(tmp_path / "store") as s:
        yield s


def saved_snapshot(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, bytes]:
    return {prefix + n: f"{t.dtype}{tuple(t.shape)}".encode() + raw(t) for n, t in state.items()}


def current(module: nn.Module, prefix: str = "") -> dict[str, bytes]:
    """The module's tensors under the names the saved files use."""
    return {n: v for n, v in module_snapshot(module).items() if n.startswith(prefix)}


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float16", "llama-tied"])
def test_apply_then_revert_is_bit_identical(tmp_path, store, kind) -> None:
    dtype = torch.float32 if kind == "llama-tied" else getattr(torch, kind)
    pair = make_model(tmp_path, dtype, llama=kind == "llama-tied", tied=kind == "llama-tied")
    store.commit("s", pair.ft, base=pair.base)
    model = copy.deepcopy(pair.base_module)
    base = module_snapshot(model)
    fine = module_snapshot(pair.ft_module)
    assert base != fine

    handle = store.apply(model, "s")
    assert module_snapshot(model) == fine
    assert sorted(handle.names) == pair.changed
    if kind == "llama-tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    handle.revert()
    assert module_snapshot(model) == base
    handle.revert()  # idempotent
    assert module_snapshot(model) == base


def test_applied_context_manager_reverts_on_exit_and_on_error(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.bfloat16)
    store.commit("s", pair.ft, base=pair.base)
    model = copy.deepcopy(pair.base_module)
    base = module_snapshot(model)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected = pair.ft_module(ids)
        with store.applied(model, "s"):
            assert torch.equal(model(ids), expected)
        assert module_snapshot(model) == base
        with pytest.raises(ZeroDivisionError):
            with store.applied(model, "s@1"):
                1 / 0
    assert module_snapshot(model) == base
    # Nothing is left registered: a fresh apply works and revert through the store undoes it.
    store.apply(model, "s")
    store.revert(model)
    assert module_snapshot(model) == base


def test_switch_between_stances_and_back_to_base(tmp_path, store) -> None:
    a = make_model(tmp_path, torch.float16, name="a")
    b_module = copy.deepcopy(a.base_module)
    finetune_(b_module, seed=99)
    b_dir = write_folder(tmp_path / "b-ft", saved_state(b_module))
    store.commit("a", a.ft, base=a.base)
    store.commit("b", b_dir, base=a.base)

    model = copy.deepcopy(a.base_module)
    base = module_snapshot(model)
    store.switch(model, "a")
    assert module_snapshot(model) == module_snapshot(a.ft_module)
    handle = store.switch(model, "b")
    assert handle.version.stance == "b"
    assert module_snapshot(model) == module_snapshot(b_module)
    store.switch(model, "a@1")
    assert module_snapshot(model) == module_snapshot(a.ft_module)
    assert store.switch(model, None) is None
    assert module_snapshot(model) == base


def test_a_switch_that_fails_leaves_the_previous_stance_applied(tmp_path, store) -> None:
    a = make_model(tmp_path, torch.float32, name="a")
    b_module = copy.deepcopy(a.base_module)
    finetune_(b_module, seed=5)
    store.commit("a", a.ft, base=a.base)
    broken = store.commit("b", write_folder(tmp_path / "b-ft", saved_state(b_module)), base=a.base).version
    path = store.objects.path(broken.tensors[-1].objects["xor"].id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))

    model = copy.deepcopy(a.base_module)
    store.switch(model, "a")
    with pytest.raises(CorruptObject):
        store.switch(model, "b")
    assert module_snapshot(model) == module_snapshot(a.ft_module)
    store.switch(model, None)
    assert module_snapshot(model) == module_snapshot(a.base_module)


def test_a_second_apply_without_revert_is_refused(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.float32)
    store.commit("s", pair.ft, base=pair.base)
    model = copy.deepcopy(pair.base_module)
    store.apply(model, "s")
    applied = module_snapshot(model)
    with pytest.raises(BaseMismatch, match="another stance applied"):
        store.apply(model, "s")
    assert module_snapshot(model) == applied
    store.revert(model)
    assert module_snapshot(model) == module_snapshot(pair.base_module)


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.model = inner
        self.value_head = nn.Linear(16, 1)


def test_a_wrapped_module_is_patched_through_its_prefix(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.bfloat16, tied=True)
    store.commit("s", pair.ft, base=pair.base)
    wrapped = Wrapper(copy.deepcopy(pair.base_module))
    base = module_snapshot(wrapped)
    with store.applied(wrapped, "s"):
        now = module_snapshot(wrapped)
        assert {n: now[n] for n in now if n.startswith("model.")} == \
            {"model." + n: v for n, v in module_snapshot(pair.ft_module).items()}
        assert now["value_head.weight"] == base["value_head.weight"]
    assert module_snapshot(wrapped) == base


def test_a_version_committed_from_a_wrapper_applies_to_the_bare_module(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.float32)
    store.commit("s", Wrapper(pair.ft_module).model, base=Wrapper(pair.base_module).model)
    wrapped_ft = {"outer." + n: t for n, t in saved_state(pair.ft_module).items()}
    wrapped_base = {"outer." + n: t for n, t in saved_state(pair.base_module).items()}
    store.commit("w", wrapped_ft, base=wrapped_base)
    model = copy.deepcopy(pair.base_module)
    with store.applied(model, "w"):
        assert module_snapshot(model) == module_snapshot(pair.ft_module)
    assert module_snapshot(model) == module_snapshot(pair.base_module)


def test_lossy_versions_revert_to_the_exact_base(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.float32)
    store.commit("s", pair.ft, base=pair.base, encoding="int8")
    model = copy.deepcopy(pair.base_module)
    base = module_snapshot(model)
    with store.applied(model, "s"):
        changed = module_snapshot(model)
        assert changed != base and changed != module_snapshot(pair.ft_module)
    assert module_snapshot(model) == base


def test_a_resized_tensor_is_swapped_in_and_back(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.float32)
    ft = dict(pair.ft_state)
    ft["embed.weight"] = torch.cat([ft["embed.weight"], torch.randn(3, 16)])
    store.commit("grown", write_folder(tmp_path / "grown", ft), base=pair.base)
    model = copy.deepcopy(pair.base_module)
    base = module_snapshot(model)
    with store.applied(model, "grown"):
        assert model.embed.weight.shape == (51, 16)
        assert raw(model.embed.weight) == raw(ft["embed.weight"])
    assert module_snapshot(model) == base
    assert model.embed.weight.shape == (48, 16)


# -- an apply that fails leaves the module as it was -------------------------------------------


def test_a_corrupt_object_is_refused_before_the_module_is_touched(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.bfloat16)
    version = store.commit("s", pair.ft, base=pair.base).version
    last = version.tensors[-1]  # verified last: every other tensor was decoded first
    path = store.objects.path(last.objects["xor"].id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    model = copy.deepcopy(pair.base_module)
    base = module_snapshot(model)
    with pytest.raises(CorruptObject) as e:
        store.apply(model, "s")
    assert e.value.object_id == last.objects["xor"].id
    assert module_snapshot(model) == base
    with pytest.raises(CorruptObject):
        with store.applied(model, "s"):
            pytest.fail("the body must not run")
    assert module_snapshot(model) == base
    # A missing object fails the same way.
    for p in object_files(store.root):
        p.unlink()
    with pytest.raises(FileNotFoundError):
        store.apply(model, "s")
    assert module_snapshot(model) == base


def test_a_module_that_is_not_the_base_names_the_tensor_and_is_left_alone(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.float16)
    version = store.commit("s", pair.ft, base=pair.base).version
    model = copy.deepcopy(pair.base_module)
    with torch.no_grad():
        model.blocks[1].mlp.weight[0, 0] += 1
    before = module_snapshot(model)
    with pytest.raises(BaseMismatch) as e:
        store.apply(model, "s")
    assert e.value.names == ["blocks.1.mlp.weight"]
    assert e.value.expected == version.base_id
    assert "blocks.1.mlp.weight" in str(e.value)
    assert module_snapshot(model) == before


def test_a_module_lacking_a_tensor_is_refused(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.float32)
    store.commit("s", pair.ft, base=pair.base)
    model = copy.deepcopy(pair.base_module)
    model.blocks[2].out = nn.Identity()
    before = module_snapshot(model)
    with pytest.raises(BaseMismatch, match="blocks.2.out.weight"):
        store.apply(model, "s")
    assert module_snapshot(model) == before


@pytest.mark.parametrize("threads", ["one thread", "two threads"])
def test_a_failure_while_writing_puts_back_what_was_written(tmp_path, store, monkeypatch, threads) -> None:
    # head.weight is patched last (entries go in name order). Here it is an expanded view,
    # which cannot be written in place: the writes before it (or beside it, on two threads)
    # must be undone.
    import deltastore.patching.apply as apply_module

    if threads == "two threads":
        monkeypatch.setattr(apply_module, "PARALLEL_WRITE_FROM", 0)
    net = tiny_net(torch.float32)
    with torch.no_grad():
        net.head.weight = nn.Parameter(net.head.weight[:1].repeat(48, 1))
    ft = copy.deepcopy(net)
    finetune_(ft)
    store.commit("s", write_folder(tmp_path / "ft", saved_state(ft)),
                 base=write_folder(tmp_path / "base", saved_state(net)))
    model = copy.deepcopy(net)
    model.head.weight = nn.Parameter(net.head.weight.detach()[:1].expand(48, 16))
    before = module_snapshot(model)
    with pytest.raises(RuntimeError, match="single memory location"):
        store.apply(model, "s")
    assert module_snapshot(model) == before
    assert module_snapshot(model) == module_snapshot(net)


class Buffers(nn.Module):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t.clone())


def test_buffers_of_every_dtype_apply_and_revert(tmp_path, store) -> None:
    gen = torch.Generator().manual_seed(4)
    base = {"f64": torch.randn(4, 3, generator=gen, dtype=torch.float64),
            "i64": torch.randint(-2**40, 2**40, (5,), generator=gen),
            "mask": torch.rand(7, generator=gen) > 0.5,
            "f8": torch.randn(6, generator=gen).to(torch.float8_e5m2)}
    ft = {"f64": base["f64"] * 1.001, "i64": base["i64"] + 1, "mask": ~base["mask"],
          "f8": (base["f8"].float() * 3).to(torch.float8_e5m2)}
    store.commit("s", Buffers(ft), base=Buffers(base), force=True)  # buffers moved far on purpose
    model = Buffers(base)
    before = module_snapshot(model)
    with store.applied(model, "s"):
        assert module_snapshot(model) == module_snapshot(Buffers(ft))
    assert module_snapshot(model) == before


def test_a_large_version_checked_two_tensors_at_a_time_applies_and_fails_the_same(tmp_path, store,
                                                                                  monkeypatch) -> None:
    import deltastore.patching.apply as apply_module

    pair = make_model(tmp_path, torch.bfloat16)
    store.commit("lossless", pair.ft, base=pair.base)
    store.commit("int4", pair.ft, base=pair.base, encoding="int4")
    model = copy.deepcopy(pair.base_module)
    base = module_snapshot(model)
    serial = {}
    for ref in ("lossless", "int4"):
        with store.applied(model, ref):
            serial[ref] = module_snapshot(model)

    # Checked, decoded, written and put back two tensors at a time.
    monkeypatch.setattr(apply_module, "PIPELINED_FROM", 0)
    monkeypatch.setattr(apply_module, "PARALLEL_WRITE_FROM", 0)
    threads = torch.get_num_threads()
    for ref in ("lossless", "int4"):
        with store.applied(model, ref):
            assert module_snapshot(model) == serial[ref]
        assert module_snapshot(model) == base
    assert torch.get_num_threads() == threads
    assert serial["lossless"] == module_snapshot(pair.ft_module)

    refuses_a_changed_base(store, model, "lossless")


def refuses_a_changed_base(store, model, ref: str) -> None:
    """One weight of the module's base nudged: apply refuses, names it, and writes nothing; the
    weight is put back after."""
    weight = model.blocks[1].mlp.weight
    kept = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] += 1
    wrong = module_snapshot(model)
    with pytest.raises(BaseMismatch) as e:
        store.apply(model, ref)
    assert e.value.names == ["blocks.1.mlp.weight"]
    assert module_snapshot(model) == wrong
    with torch.no_grad():
        weight[0, 0] = kept


class Shared(nn.Module):
    """Two buffer names for one tensor, as tied weights are."""

    def __init__(self, t: torch.Tensor):
        super().__init__()
        self.register_buffer("a", t.clone())
        self.register_buffer("b", self.a)


def test_a_tensor_under_two_names_of_a_version_applies_and_reverts(tmp_path, store) -> None:
    # Lossless results are decoded straight into the module's tensor; one that two entries
    # write must still get each result against the base it held when it was checked.
    base = torch.randn(64, 8, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    ft = (base.float() * 1.01).to(torch.bfloat16)
    store.commit("s", {"a": ft, "b": ft.clone()}, base={"a": base, "b": base.clone()}, force=True)
    assert sorted(e.name for e in store.resolve("s").tensors) == ["a", "b"]
    model = Shared(base)
    with store.applied(model, "s"):
        assert torch.equal(model.a.view(torch.int16), ft.view(torch.int16)) and model.b is model.a
    assert torch.equal(model.a.view(torch.int16), base.view(torch.int16))


# -- a small version's checks, shared with a pool thread ---------------------------------------


def test_two_threads_returns_results_in_order_and_the_first_error_in_list_order() -> None:
    from deltastore.core.pools import pool, two_threads

    assert two_threads([lambda i=i: i * i for i in range(7)]) == [i * i for i in range(7)]
    assert two_threads([]) == [] and two_threads([lambda: "one"]) == ["one"]
    ran = []

    def fails(what: str):
        def task():
            ran.append(what)
            raise ValueError(what)
        return task

    with pytest.raises(ValueError, match="first"):
        two_threads([lambda: ran.append("ok"), fails("first"), fails("second"), lambda: ran.append("last")])
    assert sorted(ran) == ["first", "last", "ok", "second"]  # every task ran; none twice
    # Called from the pool's own thread, it does the work alone instead of waiting for itself.
    assert pool("two").submit(two_threads, [lambda: 1, lambda: 2, lambda: 3]).result(timeout=30) == [1, 2, 3]


@pytest.fixture
def shared_checks(monkeypatch):
    """Every small version's checks shared with the pool thread, however few its bytes."""
    import deltastore.patching.apply as apply_module

    monkeypatch.setattr(apply_module, "SHARED_FROM", 0)


def test_a_small_version_checked_on_two_threads_applies_and_reverts(tmp_path, store, shared_checks) -> None:
    pair = make_model(tmp_path, torch.float32)
    store.commit("lossless", pair.ft, base=pair.base)
    store.commit("int8", pair.ft, base=pair.base, encoding="int8")
    model = copy.deepcopy(pair.base_module)
    base = module_snapshot(model)
    for ref in ("lossless", "int8"):
        checked.forget_all()
        with store.applied(model, ref):
            if ref == "lossless":
                assert module_snapshot(model) == module_snapshot(pair.ft_module)
            else:
                assert module_snapshot(model) != base
        assert module_snapshot(model) == base


def test_a_damaged_object_or_a_wrong_base_on_two_threads_changes_nothing(tmp_path, store, shared_checks) -> None:
    pair = make_model(tmp_path, torch.bfloat16)
    version = store.commit("s", pair.ft, base=pair.base).version
    largest = max(version.tensors, key=lambda e: e.objects["xor"].size)  # this thread's first task
    smallest = min(version.tensors, key=lambda e: e.objects["xor"].size)  # the pool thread's
    model = copy.deepcopy(pair.base_module)
    base = module_snapshot(model)
    for damaged in (largest, smallest):
        path = store.objects.path(damaged.objects["xor"].id)
        good = path.read_bytes()
        data = bytearray(good)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        checked.forget_all()
        with pytest.raises(CorruptObject) as e:
            store.apply(model, "s")
        assert e.value.object_id == damaged.objects["xor"].id
        assert module_snapshot(model) == base

        # A wrong base and a damaged object at once: the base is named.
        refuses_a_changed_base(store, model, "s")
        path.write_bytes(good)
    checked.forget_all()
    assert module_snapshot(model) == base
    with store.applied(model, "s"):
        assert module_snapshot(model) == module_snapshot(pair.ft_module)
    assert module_snapshot(model) == base


@pytest.mark.parametrize("how", ["handle", "store", "context", "switch", "switch handle", "mix"])
def test_a_reverted_module_is_not_kept_alive_by_the_store(tmp_path, store, how) -> None:
    """However a stance is taken out of a module, the store lets go of it (and of the base bytes
    the handle kept): a process that loads, applies and drops models one after another keeps
    none of them (a benchmark that did held 22 GB after six 1.5B models)."""
    import gc
    import weakref

    pair = make_model(tmp_path, torch.bfloat16)
    store.commit("s", pair.ft, base=pair.base)
    gone = []
    for _ in range(2):
        model = copy.deepcopy(pair.base_module)
        if how == "handle":
            store.apply(model, "s").revert()
        elif how == "store":
            store.apply(model, "s")
            store.revert(model)
        elif how == "context":
            with store.applied(model, "s"):
                pass
        elif how == "switch":
            store.switch(model, store.prepare("s"))
            store.revert(model)
        elif how == "switch handle":
            store.switch(model, store.prepare("s")).revert()
        else:
            store.apply(model, {"s": 0.5}).revert()
        gone.append(weakref.ref(model))
        del model
        gc.collect()
    assert [ref() for ref in gone] == [None, None]


def test_populating_a_mapped_tensor_changes_neither_it_nor_its_file(tmp_path) -> None:
    """apply.populate faults a copy-on-write tensor's pages in before apply writes them: the
    tensor keeps its bytes, and the file it was mapped from is not written."""
    import mmap

    from deltastore.patching.apply import populate

    path = tmp_path / "weights.bin"
    data = torch.randn(3 * mmap.PAGESIZE + 100, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    path.write_bytes(raw(data))
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    t = torch.frombuffer(mapped, dtype=torch.bfloat16, offset=2, count=data.numel() - 1)  # not page-aligned
    populate(t)
    assert raw(t) == raw(data[1:]) and path.read_bytes() == raw(data)
    t.mul_(2)  # written through the private copy: the file keeps its bytes
    assert path.read_bytes() == raw(data)
    del t
    mapped.close()
