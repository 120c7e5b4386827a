"""Bad input: each case is a clear one-line error of its own type that changes nothing."""

from __future__ import annotations

import copy
import json
import pickle
import struct
from pathlib import Path

import blake3
import pytest
import torch

from deltastore import (AmbiguousRef, BaseMismatch, BaseNotFound, CorruptObject, DeltastoreError,
                        EncodingError, ModelFormatError, PickleRefused, RefNotFound, Store,
                        StoreNotFound, UnsafeInput)
from deltastore.core.errors import ReadOnlyStore
from deltastore.core.hashing import canonical_json, manifest_id
from deltastore.store import find_store

from helpers import (file_bytes, flip_byte, make_model, module_snapshot, saved_state, store_snapshot,
                     tiny_net, write_folder)


@pytest.fixture
def store(tmp_path):
    with Store.init(tmp_path / "store") as s:
        yield s


@pytest.fixture
def pair(tmp_path):
    return make_model(tmp_path, torch.bfloat16)


@pytest.fixture
def committed(store, pair):
    """A store holding the base and one version of the fine-tune."""
    store.add_base(pair.base, name="tiny")
    store.commit("curious-uncertainty", pair.ft, base="tiny")
    return store


def refused(store: Store, error: type[BaseException], call, *args, **kwargs) -> BaseException:
    """Run a call that must fail with `error` and a one-line message, leaving the store as it was."""
    before = store_snapshot(store.root)
    with pytest.raises(error) as e:
        call(*args, **kwargs)
    message = str(e.value)
    assert isinstance(e.value, DeltastoreError)
    assert message and "\n" not in message and "Traceback" not in message
    assert store_snapshot(store.root) == before
    return e.value


# -- a fine-tune that does not fit its base ---------------------------------------------------------


def test_a_fine_tune_of_another_base_names_the_tensors_and_the_base(tmp_path, committed, pair) -> None:
    other = tiny_net(torch.bfloat16, layers=4)  # one block more: four tensors the base lacks
    folder = write_folder(tmp_path / "other", saved_state(other))
    base = committed.base("tiny")
    e = refused(committed, BaseMismatch, committed.commit, "curious-uncertainty", folder, base="tiny")
    extra = sorted(n for n in saved_state(other) if n.startswith("blocks.3."))
    assert e.names == extra
    assert e.expected == base.id
    # Refused by its tensor names alone, before any tensor is hashed: the model's own id is not
    # computed (test_cheap_refusals.py).
    assert e.actual is None
    message = str(e)
    assert base.id[:15] in message and base.id not in message
    assert all(name in message for name in extra[:5])


def test_a_model_of_other_shapes_is_another_base(tmp_path, committed) -> None:
    other = tiny_net(torch.bfloat16, hidden=24)
    folder = write_folder(tmp_path / "wider", saved_state(other))
    e = refused(committed, BaseMismatch, committed.commit, "s", folder, base="tiny")
    assert "other shapes" in str(e) and e.actual is None  # told by its shapes, nothing hashed
    assert len(e.names) > len(saved_state(other)) // 2


def test_missing_tensors_are_named(tmp_path, committed, pair) -> None:
    state = dict(pair.ft_state)
    del state["blocks.1.mlp.weight"], state["head.weight"]
    folder = write_folder(tmp_path / "partial", state)
    e = refused(committed, BaseMismatch, committed.commit, "s", folder, base="tiny")
    assert e.names == ["blocks.1.mlp.weight", "head.weight"]
    assert "lacks" in str(e) and "blocks.1.mlp.weight" in str(e) and "head.weight" in str(e)


def test_a_fine_tune_of_another_base_given_by_path_registers_nothing(tmp_path, store, pair) -> None:
    state = dict(pair.ft_state)
    del state["head.weight"]
    folder = write_folder(tmp_path / "partial", state)
    e = refused(store, BaseMismatch, store.commit, "s", folder, base=pair.base)
    assert e.names == ["head.weight"]
    refused(store, EncodingError, store.commit, "s", pair.ft, base=pair.base, encoding="int3")
    assert store.bases() == []
    # A base that a landed version uses stays registered.
    store.commit("s", pair.ft, base=pair.base)
    refused(store, BaseMismatch, store.commit, "s", folder, base=pair.base)
    assert len(store.bases()) == 1


def test_base_weights_changed_since_registration_are_refused(tmp_path, store, pair) -> None:
    store.add_base(pair.base, name="tiny")
    before = store_snapshot(store.root)
    with torch.no_grad():
        state = dict(pair.base_state)
        state["blocks.2.attn.weight"] = state["blocks.2.attn.weight"] + 1
    (pair.base / "model.safetensors").unlink()
    write_folder(pair.base, state, extra={})
    with pytest.raises(BaseMismatch, match="blocks.2.attn.weight") as e:
        store.commit("s", pair.ft, base="tiny")
    assert "differ from those registered" in str(e.value)
    rows, files = store_snapshot(store.root)
    assert rows == before[0]
    assert store.fsck().ok  # objects written before the mismatch are only garbage for gc


# -- files that are not safetensors, or damaged ones -------------------------------------------------


class Booby:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "model.ckpt"])
def test_pickle_checkpoints_are_refused_naming_safetensors(tmp_path, committed, name) -> None:
    marker = tmp_path / "pickle-was-loaded"
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / name).write_bytes(pickle.dumps({"w": Booby(marker)}))
    (folder / "config.json").write_text("{}")
    for model in (folder, folder / name):
        e = refused(committed, PickleRefused, committed.commit, "s", model, base="tiny")
        assert "safetensors" in str(e) and "pickle" in str(e)
        refused(committed, PickleRefused, committed.add_base, model)
    assert not marker.exists()


def corrupt_headers(path: Path) -> dict[str, bytes]:
    """Ways a safetensors file can be damaged, each as the bytes of a whole file."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    beyond = dict(header)
    beyond[name] = {**header[name], "data_offsets": [0, len(data)]}
    raw = json.dumps(beyond).encode()
    wrong_dtype = dict(header)
    wrong_dtype[name] = {**header[name], "dtype": "Q7"}
    raw2 = json.dumps(wrong_dtype).encode()
    evil = dict(header)
    evil["../../escape"] = evil.pop(name)
    raw3 = json.dumps(evil).encode()
    return {
        "truncated": data[: len(data) - 100],
        "truncated-header": data[: 8 + n // 2],
        "empty": b"",
        "header-length-past-end": struct.pack("<Q", len(data) * 10) + data[8:],
        "header-not-json": data[:8] + b"\xff" * n + data[8 + n:],
        "offsets-past-end": struct.pack("<Q", len(raw)) + raw + data[8 + n:],
        "unknown-dtype": struct.pack("<Q", len(raw2)) + raw2 + data[8 + n:],
        "path-in-name": struct.pack("<Q", len(raw3)) + raw3 + data[8 + n:],
    }


def test_truncated_and_corrupt_safetensors_are_refused(tmp_path, committed, pair) -> None:
    for kind, data in corrupt_headers(pair.ft / "model.safetensors").items():
        folder = tmp_path / f"bad-{kind}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(data)
        error = UnsafeInput if kind == "path-in-name" else ModelFormatError
        e = refused(committed, error, committed.commit, "s", folder, base="tiny")
        if kind.startswith("truncated") or kind == "offsets-past-end":
            assert "truncated" in str(e), str(e)
        assert "model.safetensors" in str(e) or kind == "path-in-name"
        refused(committed, error, committed.add_base, folder)


def test_a_folder_without_weights_or_a_path_that_does_not_exist(tmp_path, committed) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for model in (empty, tmp_path / "nowhere", tmp_path / "nowhere.safetensors"):
        e = refused(committed, ModelFormatError, committed.commit, "s", model, base="tiny")
        assert str(model) in str(e)


# -- a corrupt object -----------------------------------------------------------------------------------


def test_a_corrupt_object_is_named_by_fsck_with_every_version_it_breaks(tmp_path, store, pair) -> None:
    v1 = store.commit("curious", pair.ft, base=pair.base).version
    store.commit("curious", pair.base, base=pair.base)  # stores nothing: not broken
    store.commit("confident", pair.ft, base=pair.base)  # shares every object with curious@1
    entry = v1.entry("head.weight")
    oid = entry.objects["xor"].id
    path = store.objects.path(oid)
    flip_byte(path, path.stat().st_size // 2)

    report = store.fsck(read_data=True)
    assert not report.ok
    [problem] = report.errors
    assert problem.kind == "corrupt-object" and problem.subject == oid
    assert problem.versions == ("confident@1", "curious@1")

    model = copy.deepcopy(pair.base_module)
    base = module_snapshot(model)
    e = refused(store, CorruptObject, store.apply, model, "curious@1")
    assert e.object_id == oid and oid in str(e) and "fsck" in str(e)
    assert module_snapshot(model) == base
    target = tmp_path / "target"
    target.mkdir()
    for f in pair.base.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    refused(store, CorruptObject, store.apply_files, "confident", target)
    assert file_bytes(target) == file_bytes(pair.base)
    refused(store, CorruptObject, store.export, "curious@1", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    # The version that does not use it is untouched.
    with store.applied(model, "curious@2"):
        assert module_snapshot(model) == base


def test_a_truncated_object_is_found_without_reading_data(store, pair) -> None:
    v = store.commit("s", pair.ft, base=pair.base).version
    oid = v.tensors[0].objects["xor"].id
    path = store.objects.path(oid)
    path.write_bytes(path.read_bytes()[:-3])
    report = store.fsck()
    assert [(p.kind, p.subject, p.versions) for p in report.errors] == [("corrupt-object", oid, ("s@1",))]


# -- finding the store, and refs -----------------------------------------------------------------------


def test_no_store_found_suggests_init(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DELTASTORE_DIR", raising=False)
    nowhere = tmp_path / "no" / "store" / "here"
    nowhere.mkdir(parents=True)
    with pytest.raises(StoreNotFound) as e:
        find_store(nowhere)
    assert "deltastore init" in str(e.value) and str(nowhere) in str(e.value)
    assert isinstance(e.value, FileNotFoundError) and "\n" not in str(e.value)
    with pytest.raises(StoreNotFound, match="deltastore init"):
        Store.open(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    # Found from a folder below it.
    Store.init(tmp_path / "no" / ".deltastore").close()
    assert find_store(nowhere) == tmp_path / "no" / ".deltastore"


def test_an_unknown_ref_lists_close_names(committed) -> None:
    committed.tag("curious-uncertainty", "paper")
    e = refused(committed, RefNotFound, committed.resolve, "curious-uncertanty")
    assert e.candidates[0] == "curious-uncertainty"
    assert "did you mean curious-uncertainty" in str(e)
    e = refused(committed, RefNotFound, committed.resolve, "curious-uncertainty@7")
    assert "curious-uncertainty" in str(e)
    e = refused(committed, RefNotFound, committed.resolve, "curious-uncertainty@papr")
    assert "curious-uncertainty@paper" in e.candidates
    e = refused(committed, RefNotFound, committed.resolve, "zzzzzz")
    assert e.candidates == [] and "deltastore stances" in str(e)
    refused(committed, RefNotFound, committed.resolve, "0123456789abcdef")
    refused(committed, RefNotFound, committed.log, "curious")


def test_an_unknown_base_lists_the_known_ones(tmp_path, committed, pair) -> None:
    e = refused(committed, BaseNotFound, committed.commit, "s", pair.ft, base="tiyn")
    assert "tiny" in str(e)


def twin_manifests(template: dict) -> list[dict]:
    """Two valid manifests whose ids share their first 8 hex digits (a birthday search over
    the stance name: about 2**16 hashes)."""
    marker = "twin-XXXXXXXX"
    text = canonical_json({**template, "stance": marker, "number": 1, "parent": None})
    head, tail = text.split(marker.encode())
    seen: dict[bytes, str] = {}
    for i in range(1 << 22):
        name = f"twin-{i:08x}"
        digest = blake3.blake3(head + name.encode() + tail).digest()[:4]
        if digest in seen:
            return [{**template, "stance": s, "number": 1, "parent": None} for s in (seen[digest], name)]
        seen[digest] = name
    raise AssertionError("no collision found")


def test_an_ambiguous_id_prefix_lists_the_candidates(committed) -> None:
    template = committed.resolve("curious-uncertainty").manifest()
    twins = twin_manifests(template)
    committed.ingest(twins, lambda oid, size: committed.objects.get(oid, raw_size=size))
    a, b = (manifest_id(m) for m in twins)
    assert a[:11] == b[:11] and a != b
    e = refused(committed, AmbiguousRef, committed.resolve, a[3:11])
    assert len(e.candidates) == 2 and "more digits" in str(e)
    assert all(f"{m['stance']}@1" in str(e) for m in twins)
    assert committed.resolve(a[3:30]).id == a


def test_bad_names_and_encodings_are_refused(committed, pair) -> None:
    refused(committed, UnsafeInput, committed.commit, "../evil", pair.ft, base="tiny")
    refused(committed, UnsafeInput, committed.commit, "s", pair.ft, base="tiny", tag="12")
    refused(committed, EncodingError, committed.commit, "s", pair.ft, base="tiny", encoding="int3")
    refused(committed, UnsafeInput, committed.tag, "curious-uncertainty", "a/b")


def test_a_read_only_store_refuses_writes_and_still_reads(tmp_path, committed, pair) -> None:
    ro = Store(committed.root, readonly=True)
    target = tmp_path / "target"
    target.mkdir()
    for f in pair.base.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    for call, args in ((ro.gc, ()), (ro.apply_files, ("curious-uncertainty", target)),
                       (ro.commit, ("s", pair.ft)), (ro.tag, ("curious-uncertainty", "x")),
                       (ro.add_base, (pair.ft,))):
        kwargs = {"base": "tiny"} if call == ro.commit else {}
        e = refused(committed, ReadOnlyStore, call, *args, **kwargs)
        assert "read-only" in str(e)
    assert file_bytes(target) == file_bytes(pair.base)
    assert ro.resolve("curious-uncertainty").number == 1
    ro.close()
