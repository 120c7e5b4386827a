"""Lossless commit, then export: the fine-tune back bit for bit, in every dtype and layout."""

from __future__ import annotations

import json

import pytest
import torch

from deltastore import Store
from deltastore.core.errors import ModelFormatError
from deltastore.core.hashing import manifest_id, tensor_id
from deltastore.weights.models import open_model, other_files

from helpers import (INDEX, assert_same_state, data_object_files, file_bytes, load_folder, make_model, same_tensor,
                     store_snapshot, write_folder)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VARIANTS = {
    "plain": {},
    "tied": {"tied": True},
    "sharded": {"sharded": True},
    "llama-tied": {"llama": True, "tied": True},
    "llama-tied-sharded": {"llama": True, "tied": True, "sharded": True},
}


@pytest.fixture
def store(tmp_path):
    with Store.init(tmp_path / "store") as s:
        yield s


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_commit_then_export_is_bit_identical(tmp_path, store, dtype, variant) -> None:
    pair = make_model(tmp_path, dtype, **VARIANTS[variant])
    result = store.commit("curious", pair.ft, base=pair.base, message="first")
    out = store.export("curious", tmp_path / "export")

    assert_same_state(load_folder(out), pair.ft_state)
    # Every other file of the base folder (config, tokenizer) is copied as it was.
    others = {p.name for p in other_files(pair.base)}
    assert {"config.json", "tokenizer.json"} <= others
    exported = file_bytes(out)
    base_files = file_bytes(pair.base)
    assert {name: exported[name] for name in others} == {name: base_files[name] for name in others}
    # The sharding is the base's: the same files, the same tensors in each.
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in pair.ft.glob("*.safetensors"))
    for f in pair.ft.glob("*.safetensors"):
        assert sorted(load_folder(out / f.name)) == sorted(load_folder(f))
    if (pair.ft / INDEX).exists():
        assert json.loads((out / INDEX).read_text())["weight_map"] == json.loads((pair.ft / INDEX).read_text())["weight_map"]
    else:
        assert not (out / INDEX).exists()

    v = result.version
    assert (v.stance, v.number, v.parent, v.message, v.encoding) == ("curious", 1, None, "first", "lossless")
    assert v.id == manifest_id(v.manifest())
    assert store.resolve("curious").id == store.resolve("curious@1").id == v.id


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensors_equal_to_the_base_are_not_stored(tmp_path, store, dtype) -> None:
    pair = make_model(tmp_path, dtype)
    assert pair.unchanged and pair.changed  # the norms are frozen, the rest moved
    result = store.commit("s", pair.ft, base=pair.base)
    stored = sorted(e.name for e in result.version.tensors)
    assert stored == pair.changed
    assert result.tensors_stored == len(pair.changed)
    assert result.unchanged == len(pair.unchanged)
    for e in result.version.tensors:
        assert e.encoding == "lossless" and e.exact and e.params["mode"] == "xor"
        assert e.base_tensor_id == tensor_id(pair.base_state[e.name])
        assert e.target_tensor_id == e.result_tensor_id == tensor_id(pair.ft_state[e.name])
        b, f = pair.base_state[e.name].double(), pair.ft_state[e.name].double()
        assert e.rel_change == pytest.approx(float((f - b).norm() / b.norm()), rel=1e-4)
        assert e.rel_error == 0.0
    # A commit of the base itself stores nothing at all.
    same = store.commit("nothing", pair.base, base=pair.base)
    assert same.version.tensors == () and same.bytes_new == 0 and same.unchanged == len(pair.base_state)


def test_a_bf16_delta_is_smaller_than_the_fine_tune(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.bfloat16, layers=2, hidden=128)
    result = store.commit("s", pair.ft, base=pair.base)
    ft_bytes = sum(t.numel() * t.element_size() for t in pair.ft_state.values())
    assert result.bytes_stored == sum(p.stat().st_size for p in data_object_files(store.root))
    assert result.bytes_stored < 0.6 * ft_bytes


def test_committing_the_same_fine_tune_twice_adds_no_object_bytes(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.bfloat16, llama=True, tied=True)
    first = store.commit("s", pair.ft, base=pair.base)
    assert first.bytes_new == first.bytes_stored > 0
    files = {p: p.read_bytes() for p in data_object_files(store.root)}
    second = store.commit("s", pair.ft, base=pair.base, message="again", allow_empty=True)
    other = store.commit("t", pair.ft_state, base=pair.base_module)
    for r in (second, other):
        assert r.bytes_new == 0
        assert r.bytes_stored == first.bytes_stored
    # The same tensor objects: only the versions' manifests are new.
    assert {p: p.read_bytes() for p in data_object_files(store.root)} == files
    assert second.version.number == 2 and second.version.parent == first.version.id
    assert second.version.id != first.version.id
    stats = store.stats()
    assert stats.bytes_stored == first.bytes_stored
    assert stats.bytes_saved_by_dedup == 2 * first.bytes_stored
    assert [v.number for v in store.log("s")] == [2, 1]


def test_commit_from_modules_and_state_dicts(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.float32, tied=True)
    r = store.commit("s", pair.ft_module, base=pair.base_module)
    # The base came in as a module: its weights are not on disk, so export is told where.
    assert_same_state(load_folder(store.export(r.version, tmp_path / "out", base_weights=pair.base)),
                      pair.ft_state)
    assert_same_state(dict(store.tensors("s", base_weights=pair.base_state)), pair.ft_state)


def test_export_finds_the_base_where_it_was_registered(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.float16, sharded=True)
    store.add_base(pair.base, name="tiny")
    store.commit("s", pair.ft, base="tiny")
    store.commit("s", pair.base, base="tiny")
    assert_same_state(load_folder(store.export("s@1", tmp_path / "v1")), pair.ft_state)
    assert_same_state(load_folder(store.export("s@2", tmp_path / "v2")), pair.base_state)


def test_resized_tensors_are_stored_raw_and_exported_exactly(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.bfloat16)
    ft = dict(pair.ft_state)
    # A grown vocabulary (two new token rows) and one tensor kept in fp32.
    ft["embed.weight"] = torch.cat([ft["embed.weight"], torch.randn(2, ft["embed.weight"].shape[1]).bfloat16()])
    ft["head.weight"] = torch.cat([ft["head.weight"], torch.randn(2, ft["head.weight"].shape[1]).bfloat16()])
    ft["blocks.0.attn.bias"] = pair.ft_state["blocks.0.attn.bias"].float() + 1e-6
    folder = write_folder(tmp_path / "resized", ft)
    result = store.commit("grown", folder, base=pair.base)
    modes = {e.name: e.params["mode"] for e in result.version.tensors}
    assert modes["embed.weight"] == modes["head.weight"] == modes["blocks.0.attn.bias"] == "raw"
    assert modes["blocks.0.attn.weight"] == "xor"
    entry = result.version.entry("embed.weight")
    assert entry.shape == tuple(ft["embed.weight"].shape) and entry.dtype == "BF16"
    assert result.version.entry("blocks.0.attn.bias").dtype == "F32"
    assert_same_state(load_folder(store.export("grown", tmp_path / "out")), ft)


def test_every_safetensors_dtype_round_trips(tmp_path, store) -> None:
    gen = torch.Generator().manual_seed(3)
    base = {
        "f64": torch.randn(5, 7, generator=gen, dtype=torch.float64),
        "i64": torch.randint(-2**40, 2**40, (9,), generator=gen),
        "i32": torch.randint(-1000, 1000, (3, 3), generator=gen, dtype=torch.int32),
        "i16": torch.randint(-1000, 1000, (4,), generator=gen, dtype=torch.int16),
        "i8": torch.randint(-100, 100, (6,), generator=gen, dtype=torch.int8),
        "u8": torch.randint(0, 255, (6,), generator=gen, dtype=torch.uint8),
        "bool": torch.rand(11, generator=gen) > 0.5,
        "f8": torch.randn(8, generator=gen).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
    }
    ft = {k: v.clone() for k, v in base.items()}
    ft["f64"] += 1e-9
    ft["i64"][2] += 1
    ft["i32"][1, 1] -= 7
    ft["i16"][0] ^= 3
    ft["i8"][5] = 0
    ft["u8"][0] ^= 0xFF
    ft["bool"] = ~ft["bool"]
    ft["f8"] = (ft["f8"].float() * 2).to(torch.float8_e4m3fn)
    ft["scalar"] = torch.tensor(-2.0)
    result = store.commit("dtypes", write_folder(tmp_path / "ft", ft), base=write_folder(tmp_path / "base", base))
    assert sorted(e.name for e in result.version.tensors) == sorted(set(base) - {"empty"})
    assert_same_state(load_folder(store.export("dtypes", tmp_path / "out")), ft)


def test_in_order_runs_ahead_of_a_slow_tensor_and_stops_when_one_fails() -> None:
    import threading
    import time

    from deltastore.core.pools import in_order

    def run(ahead):
        started, release, out = [], threading.Event(), []

        def work(name):
            started.append(name)
            if name == 0:  # a large first tensor
                release.wait(10)
            return name * 10
        consumer = threading.Thread(target=lambda: out.extend(in_order(list(range(6)), work, ahead=ahead)))
        consumer.start()
        deadline = time.monotonic() + 10
        while len(started) < min(6, ahead) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        seen = sorted(started)
        release.set()
        consumer.join(10)
        return seen, out

    seen, out = run(ahead=2)
    assert seen == [0, 1] and out == [(i, i * 10) for i in range(6)]
    seen, out = run(ahead=6)
    assert seen == list(range(6)) and out == [(i, i * 10) for i in range(6)]

    started = []

    def failing(name):
        started.append(name)
        if name == 2:
            raise ValueError("tensor 2")
        time.sleep(0.05)
        return name
    got = []
    with pytest.raises(ValueError, match="tensor 2"):
        for item in in_order(list(range(20)), failing, ahead=20):
            got.append(item)
    assert got == [(0, 0), (1, 1)]
    assert len(started) <= 5  # the tensors in flight when it failed, not the other 17

    started.clear()
    it = in_order(list(range(20)), failing, ahead=20)
    assert next(it) == (0, 0)
    it.close()  # the caller stops early: what is queued never starts
    assert len(started) <= 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
def test_a_large_tensor_is_streamed_to_the_same_object(tmp_path, store, dtype) -> None:
    # Past STREAM_FROM the XOR payload is hashed and compressed chunk by chunk: the object
    # must hold exactly the bytes the one-shot encoding gives, and export the fine-tune.
    from deltastore.codecs.encodings import get
    from deltastore.codecs.xorbytes import STREAM_FROM, xor_grouped, xor_planes
    from deltastore.core.hashing import bytes_id

    g = torch.Generator().manual_seed(7)
    n = STREAM_FROM // torch.empty(0, dtype=dtype).element_size() + 12345
    if dtype == torch.uint8:
        base = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
        tuned = base.clone()
        tuned[::3] += 1
    else:
        base = torch.randn(n, generator=g).to(dtype)
        tuned = (base.float() + 1e-3 * torch.randn(n, generator=g)).to(dtype)
    small = torch.randn(8, generator=g)
    write_folder(tmp_path / "base", {"big": base, "small": small})
    write_folder(tmp_path / "ft", {"big": tuned, "small": small + 1})

    streamed = get("lossless").stream(base, tuned)
    assert streamed is not None and streamed.size == n * base.element_size()
    assert b"".join(bytes(c) for c in streamed.chunks()) == bytes(xor_grouped(base, tuned))
    assert b"".join(bytes(c) for c in xor_planes(base, tuned, chunk=1000)) == bytes(xor_grouped(base, tuned))

    store.add_base(tmp_path / "base", name="base")
    # Of two tensors, "small" moved by far more than a fine-tune would: the median is its half.
    result = store.commit("curious", tmp_path / "ft", base="base", force=True)
    entry = {e.name: e for e in result.version.tensors}["big"]
    assert entry.objects["xor"].id == bytes_id(xor_grouped(base, tuned))
    assert entry.result_tensor_id == tensor_id(tuned)
    assert_same_state(load_folder(store.export("curious", tmp_path / "export")), {"big": tuned, "small": small + 1})
    assert store.fsck(read_data=True).ok
    before = sorted(data_object_files(store.root))
    again = store.commit("curious", tmp_path / "ft", base="base", force=True, allow_empty=True)
    assert again.bytes_new == 0 and sorted(data_object_files(store.root)) == before


def test_a_model_written_while_it_is_committed_is_refused_and_nothing_lands(tmp_path, store) -> None:
    """Commit reads both models through memory maps: a file written meanwhile would mix old
    and new bytes, so the commit is refused and leaves the store as it was."""
    pair = make_model(tmp_path, torch.float32)
    store.add_base(pair.base, name="base")
    before = store_snapshot(store.root)
    weights = pair.ft / "model.safetensors"
    written = []

    def write_the_file(done: int, total: int) -> None:
        if not written:  # after the first tensor: a training script saving over it, in place
            with open(weights, "r+b") as f:
                f.seek(-4, 2)
                f.write(b"\0\0\0\0")
            written.append(done)

    with pytest.raises(ModelFormatError, match="changed while it was being read"):
        store.commit("curious", pair.ft, base="base", progress=write_the_file)
    assert written and store_snapshot(store.root) == before
    assert store.stances() == []


def test_mapped_tensors_stay_readable_once_released(tmp_path) -> None:
    pair = make_model(tmp_path, torch.bfloat16)
    source = open_model(pair.ft, mapped=True)
    for name in source.names:
        t = source.get(name)
        source.release(name)  # its pages are let go; a later read faults them in again
        assert same_tensor(t, pair.ft_state[name]) and same_tensor(source.get(name), pair.ft_state[name]), name
    source.check_unchanged()


def test_commit_from_a_base_path_hashes_the_base_once(tmp_path, store, monkeypatch) -> None:
    # A commit from an unregistered base path hashes the base to find its id (from the mapped
    # bytes, baseweights.py); the commit itself then trusts those ids (a file written in
    # between is still refused by check_unchanged).
    import deltastore.engine.baseweights
    import deltastore.engine.commit

    pair = make_model(tmp_path, torch.float32)
    hashed: list[str] = []

    def spy(module, name):
        real = getattr(module, name)

        def counted(*args):
            hashed.append(module.__name__)
            return real(*args)
        monkeypatch.setattr(module, name, counted)

    spy(deltastore.engine.baseweights, "id_header")  # once per tensor hashed
    spy(deltastore.engine.commit, "tensor_id")
    result = store.commit("curious", pair.ft, base=pair.base)
    names = open_model(pair.base).names
    by_module = {m: hashed.count(m) for m in ("deltastore.engine.baseweights", "deltastore.engine.commit")}
    # Each base tensor once (to find the base id); each fine-tuned tensor once (commit.py).
    assert by_module == {"deltastore.engine.baseweights": len(names), "deltastore.engine.commit": len(names)}
    assert store.export(result.version.ref, tmp_path / "out") and \
        load_folder(tmp_path / "out").keys() == load_folder(pair.ft).keys()


def test_a_selector_and_its_options_one_by_one_commit_the_same(tmp_path, store) -> None:
    from deltastore.codecs.selection import Selector

    pair = make_model(tmp_path, torch.float32)
    by_object = store.commit("a", pair.ft, base=pair.base, selector=Selector(exclude="embed", top_k=3))
    by_keywords = store.commit("b", pair.ft, base=pair.base, exclude="embed", top_k=3)
    # A keyword given beside a selector replaces that field of it.
    replaced = store.commit("c", pair.ft, base=pair.base, selector=Selector(exclude="embed", top_k=1), top_k=3)
    manifests = [store.resolve(r.version.ref) for r in (by_object, by_keywords, replaced)]
    assert len({tuple(e.name for e in v.tensors) for v in manifests}) == 1
    assert len(manifests[0].tensors) == 3 and not any("embed" in e.name for e in manifests[0].tensors)
    assert manifests[0].selection == manifests[1].selection == manifests[2].selection == \
        {"exclude": ["embed"], "top_k": 3}
