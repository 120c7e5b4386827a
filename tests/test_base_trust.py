"""A base's weights hashed at disk speed: ids from the mapped bytes, squared norms in numpy (bit
for bit torch's), and weight files trusted by their stat data once hashed whole (repo/trust.py),
as git's index trusts a file: re-hashed when touched, when racy, and with --verify."""

from __future__ import annotations

import json
import math
import os
import shutil
import types

import pytest
import torch

import deltastore.engine.baseweights
import deltastore.engine.commit
import deltastore.patching.patch
import deltastore.weights.models
from deltastore import Store
from deltastore.core.errors import BaseMismatch
from deltastore.core.hashing import canonical_json, dtype_name, tensor_bytes, tensor_id
from deltastore.metrics.norms import sq_norm
from deltastore.metrics.rawnorms import CHUNK, SqNorm, raw_sq_norm
from deltastore.repo import index, trust
from deltastore.weights.models import open_model, weight_files

from helpers import file_bytes, make_model, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
HOUR_NS = 3600 * 10**9
FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_the_numpy_norm_is_torchs_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(7)
    shapes = [(0,), (3, 0), (1,), (7, 5), (1000, 1000), (3, CHUNK), (2 * CHUNK + 13,)]
    tensors = [(torch.randn(s, generator=gen) * 3).to(dtype) for s in shapes]
    for special in (math.nan, math.inf, -math.inf, 3e38):
        t = torch.randn(100, generator=gen)
        t[17] = special
        tensors.append(t.to(dtype))
    for t in tensors:
        mine, torchs = raw_sq_norm(dtype_name(t.dtype), tensor_bytes(t)), sq_norm(t)
        assert repr(mine) == repr(torchs), (dtype, tuple(t.shape))
        assert (mine is None) == (torchs is None) and (mine is None or math.isclose(mine, torchs, rel_tol=1e-6))
        # A block of whole slices at a time (a mapped tensor's blocks), the last partial: the same.
        data, block = tensor_bytes(t), CHUNK * t.element_size()
        blockwise = SqNorm(dtype_name(t.dtype))
        for at in range(0, len(data), block):
            blockwise.add(data[at:at + block])
        assert repr(blockwise.value()) == repr(torchs), (dtype, tuple(t.shape))


def test_every_float8_code_widens_as_torch_widens_it():
    codes = torch.arange(256, dtype=torch.uint8)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        for code in codes:
            t = code.reshape(1).view(dtype)
            assert repr(raw_sq_norm(dtype_name(dtype), tensor_bytes(t))) == repr(sq_norm(t)), (dtype, int(code))


def test_integer_tensors_have_no_norm():
    assert raw_sq_norm("I32", tensor_bytes(torch.arange(10, dtype=torch.int32))) is None


def _torch_record(path) -> tuple[str, bytes]:
    """The base id and base record of a model's weights as torch describes them (the code before)."""
    source = open_model(path)
    ids = {n: tensor_id(source.get(n)) for n in source.names}
    bid = __import__("deltastore.core.hashing", fromlist=["base_id"]).base_id(ids.items())
    tensors = [{"name": n, "dtype": i.dtype, "shape": json.dumps(list(i.shape)), "tensor_id": ids[n],
                "sq_norm": sq_norm(source.get(n))} for n, i in source.infos.items()]
    return bid, canonical_json(index.base_record(bid, source.nbytes, tensors))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
def test_the_base_id_and_record_are_those_torch_gave(tmp_path, dtype):
    pair = make_model(tmp_path, dtype, sharded=True)
    with Store.init(tmp_path / "store") as store:
        base = store.add_base(pair.base)
        bid, record = _torch_record(pair.base)
        assert base.id == bid
        assert store.repo.objects.get(store.catalog.base_record_id(bid)) == record


def age(folder) -> None:
    """Date a folder's files an hour back: they are then not racy."""
    for f in folder.iterdir():
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns - HOUR_NS, st.st_mtime_ns - HOUR_NS))


@pytest.fixture
def aged(tmp_path):
    """A sharded model whose files were written an hour ago (not racy), and a store."""
    pair = make_model(tmp_path, torch.bfloat16, sharded=True)
    age(pair.base)
    age(pair.ft)
    with Store.init(tmp_path / "store") as store:
        yield pair, store


def counting(monkeypatch, module, name: str) -> list[int]:
    """Each call of `module.name` (a hash), counted."""
    seen: list[int] = []
    real = getattr(module, name)

    def counted(*args):
        seen.append(1)
        return real(*args)
    monkeypatch.setattr(module, name, counted)
    return seen


@pytest.fixture
def hashed(monkeypatch):
    """The tensors hashed for a base's record (baseweights.py)."""
    return counting(monkeypatch, deltastore.engine.baseweights, "id_header")  # one per tensor hashed


def test_a_base_add_of_unchanged_files_hashes_nothing(aged, hashed):
    pair, store = aged
    first = store.add_base(pair.base, name="b")
    count = len(open_model(pair.base).names)
    assert len(hashed) == count
    again = store.add_base(pair.base, name="b")
    assert len(hashed) == count and again == first
    assert run_cli(store, "base", "add", str(pair.base), "--verify").exit_code == 0
    assert len(hashed) == 2 * count
    store.add_base(pair.base, verify=True)
    assert len(hashed) == 3 * count


def test_a_file_written_in_place_is_hashed_again_and_the_change_caught(aged, hashed):
    pair, store = aged
    first = store.add_base(pair.base)
    hashed.clear()
    shard = weight_files(pair.base)[0]
    before = shard.stat()
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # same size, new bytes, then the old mtime put back
        f.seek(size - 4)
        f.write(b"\x01\x02\x03\x04")
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert shard.stat().st_size == size and shard.stat().st_mtime_ns == before.st_mtime_ns
    changed = store.add_base(pair.base)
    in_shard = [n for n, i in open_model(pair.base).infos.items() if i.file == shard]
    assert len(hashed) == len(in_shard)  # that shard only: the others are unchanged
    assert changed.id != first.id


def test_a_racy_file_is_hashed_again(aged, hashed, monkeypatch):
    # Its mtime is the time of the record: a write in the same clock tick would leave its stat as
    # it was, so the record proves nothing.
    pair, store = aged
    mtimes = {f: f.stat().st_mtime_ns for f in weight_files(pair.base)}
    clock = iter(mtimes.values())
    with monkeypatch.context() as m:
        m.setattr(deltastore.weights.models, "time", types.SimpleNamespace(time_ns=lambda: next(clock)))
        store.add_base(pair.base)
    rows = trust.entries(store.root)
    assert sorted(r["hashed_ns"] for r in rows.values()) == sorted(mtimes.values())
    count = len(hashed)
    store.add_base(pair.base)
    assert len(hashed) == 2 * count
    # Hashed again at a safe distance, the files are trusted from then on.
    store.add_base(pair.base)
    assert len(hashed) == 2 * count


def test_freshly_written_files_are_racy(tmp_path, hashed):
    pair = make_model(tmp_path, torch.float32)
    with Store.init(tmp_path / "store") as store:
        store.add_base(pair.base)
        store.add_base(pair.base)
    assert len(hashed) == 2 * len(open_model(pair.base).names)


@pytest.fixture
def commit_hashes(monkeypatch):
    return counting(monkeypatch, deltastore.engine.commit, "tensor_id")


def test_a_commit_trusts_the_registered_files(aged, commit_hashes):
    pair, store = aged
    store.add_base(pair.base)
    names = open_model(pair.base).names
    store.commit("s", pair.ft, base=store.bases()[0])
    assert len(commit_hashes) == len(names)  # the fine-tune's tensors only
    assert run_cli(store, "commit", "s", str(pair.ft), "--verify", "--allow-empty").exit_code == 0
    assert len(commit_hashes) == 3 * len(names)  # the base's too


def test_a_commit_refuses_a_trusted_file_written_since(aged, commit_hashes):
    pair, store = aged
    store.add_base(pair.base)
    shard = weight_files(pair.base)[-1]
    before = shard.stat()
    with open(shard, "r+b") as f:
        f.seek(before.st_size - 4)
        f.write(b"\x01\x02\x03\x04")
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(BaseMismatch):
        store.commit("s", pair.ft, base=store.bases()[0])


@pytest.fixture
def apply_hashes(monkeypatch):
    return counting(monkeypatch, deltastore.weights.models.TensorSource, "tensor_id")


def test_an_in_place_apply_trusts_only_files_this_store_hashed(aged, apply_hashes, tmp_path):
    pair, store = aged
    base = store.add_base(pair.base)
    version = store.commit("s", pair.ft, base=base).version
    copy = tmp_path / "copy"
    shutil.copytree(pair.base, copy)
    age(copy)
    # A copy this store never hashed: each region compared with the base's own files, which it
    # trusts, and found equal: nothing hashed (`cp -r base work && deltastore apply`).
    store.apply_files(version.ref, copy)
    assert len(apply_hashes) == 0
    store.revert_files(copy)
    store.apply_files(version.ref, copy, copy_originals=True)  # nothing compared: every region hashed
    assert len(apply_hashes) == len(version.tensors)
    store.revert_files(copy)
    age(copy)
    store.add_base(copy)  # now hashed whole (revert wrote it: its stat is new)
    store.apply_files(version.ref, copy, copy_originals=True)
    assert len(apply_hashes) == len(version.tensors)
    store.revert_files(copy)
    age(copy)
    assert run_cli(store, "base", "add", str(copy)).exit_code == 0
    assert run_cli(store, "apply", version.ref, str(copy), "--verify").exit_code == 0
    assert len(apply_hashes) == 2 * len(version.tensors)


def test_a_region_that_differs_from_the_trusted_base_file_is_hashed_and_refused(aged, apply_hashes, tmp_path):
    pair, store = aged
    version = store.commit("s", pair.ft, base=store.add_base(pair.base)).version
    copy = tmp_path / "copy"
    shutil.copytree(pair.base, copy)
    info = open_model(copy).infos[version.tensors[-1].name]  # a tensor the version patches
    data = bytearray(info.file.read_bytes())
    data[info.start + 1] ^= 0x10
    info.file.write_bytes(bytes(data))
    age(copy)
    before = file_bytes(copy)
    with pytest.raises(BaseMismatch, match="nothing was changed"):
        store.apply_files(version.ref, copy)
    assert len(apply_hashes) >= 1 and file_bytes(copy) == before
    assert store.catalog.open_journals() == []


def test_an_export_trusts_the_base_files_this_store_hashed(aged, apply_hashes, tmp_path):
    pair, store = aged
    version = store.commit("s", pair.ft, base=store.add_base(pair.base)).version
    before = len(apply_hashes)
    store.export(version.ref, tmp_path / "trusted")  # the base's files, hashed by base add
    assert len(apply_hashes) == before
    assert run_cli(store, "export", version.ref, "--out", str(tmp_path / "verified"), "--verify").exit_code == 0
    assert len(apply_hashes) == before + len(open_model(pair.base).names)
    assert file_bytes(tmp_path / "trusted") == file_bytes(tmp_path / "verified")
    age(pair.base)
    shard = weight_files(pair.base)[-1]
    stat = shard.stat()
    with open(shard, "r+b") as f:  # written behind the store's back, its times put back
        f.seek(stat.st_size - 4)
        f.write(b"\x01\x02\x03\x04")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # Its ctime moved: the file is no longer trusted, and the hash finds the change.
    with pytest.raises(BaseMismatch):
        store.export(version.ref, tmp_path / "changed")


def test_a_damaged_trust_file_trusts_nothing_and_stops_nothing(aged, hashed):
    pair, store = aged
    store.add_base(pair.base)
    path = store.root / trust.FILE
    text = path.read_text()
    tid = next(iter(next(iter(trust.entries(store.root).values()))["tensors"].values()))[0]
    path.write_text(text.replace(tid, tid[:-1] + ("0" if tid[-1] != "0" else "1"), 1))
    assert len(trust.entries(store.root)) == len(weight_files(pair.base)) - 1  # that entry's checksum fails
    count = len(hashed)
    assert store.add_base(pair.base).id == store.bases()[0].id
    assert len(hashed) > count
    path.write_bytes(b"\x00garbage")
    assert run_cli(store.root, "base", "list").exit_code == 0
    store.add_base(pair.base)
    assert len(trust.entries(store.root)) == len(weight_files(pair.base))


def test_the_trust_survives_a_rebuild_and_fsck_never_reads_it(aged, monkeypatch):
    pair, store = aged
    store.add_base(pair.base)
    rows = trust.entries(store.root)
    root = store.root
    store.close()
    assert run_cli(root, "fsck", "--rebuild-catalog").exit_code == 0
    assert trust.entries(root) == rows and rows

    def never(*args, **kwargs):
        raise AssertionError("fsck read the trusted files")
    monkeypatch.setattr(trust, "trusted", never)
    assert run_cli(root, "fsck", "--read-data").exit_code == 0


def test_a_refused_base_add_trusts_nothing(aged):
    # A command that fails leaves no trace: not even the cache of what it hashed.
    pair, store = aged
    with pytest.raises(BaseMismatch):
        store.add_base(pair.base, expected_id="b3:" + "0" * 64)
    assert not (store.root / trust.FILE).exists() and store.bases() == []
