"""Records from outside the code that wrote them: a remote's refs and base records, a Hub
index, a ref log written by hand. Each is checked where it comes in; a bad one is refused with
one line naming it and nothing is stored, or (a ref log record the catalog cannot index) set
aside where the user can read it, never looping between two pieces of advice.

Every hostile record is written the way anyone with write access could: files on the remote,
commits to a Hub repo with the plain client, lines appended to refs.log.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import CommitOperationAdd, HfApi, constants

from cli.main import cli
from deltastore import Store
from deltastore.core.errors import NotAFineTune, PulledDataRejected, RemoteDataRejected, UnsafeInput
from deltastore.core.hashing import canonical_json
from deltastore.sharing.hub import pull as hub_pull
from deltastore.sharing.hub import push as hub_push
from deltastore.core.names import MAX_NUMBER
from deltastore.sharing.remote import Remote, clone, pull, push

from helpers import finetune_, make_model, saved_state, store_snapshot, write_folder
from hubserver import HubServer

TOKEN = "tok-mallory"
REPO = "mallory/stances"
HUGE = 3_000_000_000  # past 2^31 - 1, and 10 digits: a remote's ref file name allows it


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base on disk, two fine-tunes of it, and store A with s@1 and s@2 against the base."""
    tmp = tmp_path_factory.mktemp("world")
    pair = make_model(tmp)
    fts = []
    for n in range(3):
        module = copy.deepcopy(pair.base_module)
        finetune_(module, seed=700 + n)
        fts.append(write_folder(tmp / f"ft-{n}", saved_state(module)))
    store = Store.init(tmp / "a-store")
    store.add_base(pair.base, name="tiny")
    store.commit("s", fts[0], base="tiny")
    store.commit("s", fts[1], base="tiny")
    yield pair, fts, store
    store.close()


def snapshot(root: Path) -> tuple[dict, dict, bytes]:
    """What a store holds: catalog rows, object files, the ref log."""
    return (*store_snapshot(root), (root / "refs.log").read_bytes())


def one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _write(remote: Remote, path: str, data: bytes) -> None:
    remote.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    remote.fs.pipe_file(path, data)


def _renumber_on_remote(remote: Remote, stance: str, old: int, new: int) -> None:
    """Move a version's ref on the remote to another number, as anyone could."""
    ref = json.loads(remote.fs.cat_file(remote.ref_path(stance, old)))
    remote.fs.rm_file(remote.ref_path(stance, old))
    _write(remote, remote.ref_path(stance, new), canonical_json({**ref, "number": new}) + b"\n")


# -- 5. version numbers are bounded on every path ------------------------------------------------


def test_a_remote_ref_past_the_bound_is_refused_by_pull_and_clone(world, tmp_path):
    pair, _, a = world
    url = f"file://{tmp_path / 'remote'}"
    push(a, ["s@1", "s@2"], url)
    _renumber_on_remote(Remote(url), "s", 2, HUGE)
    with Store.init(tmp_path / "victim") as victim:
        victim.add_base(pair.base, name="tiny")
        before = snapshot(victim.root)
        with pytest.raises(RemoteDataRejected, match=f"{HUGE}.*out of range"):
            pull(victim, url)
        assert snapshot(victim.root) == before
    with pytest.raises(RemoteDataRejected, match=str(HUGE)):
        clone(url, tmp_path / "clone")
    assert not (tmp_path / "clone").exists()
    line = one_line(CliRunner().invoke(cli, ["clone", url, str(tmp_path / "clone")]))
    assert str(HUGE) in line and "out of range" in line
    assert not (tmp_path / "clone").exists()


def test_a_commit_after_the_last_number_is_refused(world, tmp_path):
    """A remote may number a version 2^31 - 1: it lands, and the next commit has no number left."""
    pair, fts, a = world
    url = f"file://{tmp_path / 'remote'}"
    push(a, ["s@1"], url)
    _renumber_on_remote(Remote(url), "s", 1, MAX_NUMBER)
    store, result = clone(url, tmp_path / "clone")
    with store:
        assert [rv.ref for rv in result.pulled] == [f"s@{MAX_NUMBER}"]
        store.add_base(pair.base)
        before = snapshot(store.root)
        with pytest.raises(UnsafeInput, match=f"{MAX_NUMBER}"):
            store.commit("s", fts[2], base=pair.base)
        assert snapshot(store.root) == before
        line = one_line(CliRunner().invoke(cli, ["--store", str(store.root), "commit", "s", str(fts[2]),
                                                 "--base", str(pair.base)]))
        assert "nothing was stored" in line
        assert snapshot(store.root) == before
        # Nor may a merge number versions past it.
        store.commit("t", fts[2], base=pair.base)
        before = snapshot(store.root)
        line = one_line(CliRunner().invoke(cli, ["--store", str(store.root), "stance", "merge", "t", "s"]))
        assert str(MAX_NUMBER) in line and "nothing was changed" in line
        assert snapshot(store.root) == before


def test_ingest_refuses_a_number_past_the_bound(world, tmp_path):
    pair, _, a = world
    v = a.resolve("s@1")
    with Store.init(tmp_path / "victim") as victim:
        victim.add_base(pair.base, name="tiny")
        before = snapshot(victim.root)
        with pytest.raises(UnsafeInput, match=f"{1 << 31}.*out of range"):
            victim.ingest([v.manifest()], lambda oid, size: a.objects.get(oid, raw_size=size),
                          numbers={v.id: 1 << 31})
        assert snapshot(victim.root) == before


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with HubServer(tmp_path / "hub", tokens={TOKEN: "mallory"}) as server:
        yield server


def test_a_hub_index_number_past_the_bound_is_refused(world, hub, tmp_path):
    pair, _, a = world
    hub_push(a, ["s@1"], REPO, token=TOKEN, endpoint=hub.url, progress=False)
    api = HfApi(endpoint=hub.url, token=TOKEN)
    files = {name: Path(api.hf_hub_download(REPO, name, cache_dir=tmp_path / "dl")).read_bytes()
             for name in ("deltastore.json", "s/v1.json", "s/v1.safetensors")}
    index = json.loads(files["deltastore.json"])
    entry = index["stances"]["s"][0]
    entry.update(number=HUGE, tag=f"s-v{HUGE}",
                 files={"payloads": f"s/v{HUGE}.safetensors", "manifest": f"s/v{HUGE}.json"})
    api.create_commit(REPO, [CommitOperationAdd("deltastore.json", json.dumps(index).encode()),
                             CommitOperationAdd(f"s/v{HUGE}.json", files["s/v1.json"]),
                             CommitOperationAdd(f"s/v{HUGE}.safetensors", files["s/v1.safetensors"])],
                      commit_message="renumbered")
    with Store.init(tmp_path / "victim") as victim:
        victim.add_base(pair.base, name="tiny")
        before = snapshot(victim.root)
        with pytest.raises(PulledDataRejected, match=f"{HUGE}.*out of range"):
            hub_pull(victim, REPO, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache", progress=False)
        assert snapshot(victim.root) == before


# -- 8. a ref log record the catalog cannot index ------------------------------------------------


def _store_with_a_foreign_version(world, tmp_path) -> tuple[Store, str]:
    """A store holding s@1, and the objects of a version made in another store (another
    fine-tune, also committed as s@1 there): a hand-written record can name it."""
    pair, fts, _ = world
    with Store.init(tmp_path / "other") as other:
        other.add_base(pair.base, name="tiny")
        foreign = other.commit("s", fts[2], base="tiny").version.id
    store = Store.init(tmp_path / "store")
    store.add_base(pair.base, name="tiny")
    store.commit("s", fts[0], base="tiny")
    for path in sorted((tmp_path / "other" / "objects").rglob("*")):
        dest = store.root / path.relative_to(tmp_path / "other")
        if path.is_file() and not dest.exists():
            dest.parent.mkdir(exist_ok=True)
            dest.write_bytes(path.read_bytes())
    return store, foreign


def _append(root: Path, record: dict) -> bytes:
    line = canonical_json(record) + b"\n"
    with open(root / "refs.log", "ab") as f:
        f.write(line)
    return line


def _invoke(root: Path, *args: str):
    return CliRunner().invoke(cli, ["--store", str(root), *args])


@pytest.mark.parametrize("number, why", [(1, "s@1 is already version"), (HUGE, "out of range")],
                         ids=["number-held", "number-past-the-bound"])
def test_a_record_the_catalog_cannot_index_is_named_then_set_aside(world, tmp_path, number, why):
    store, foreign = _store_with_a_foreign_version(world, tmp_path)
    root = store.root
    store.close()
    good_log = (root / "refs.log").read_bytes()
    line_no = good_log.count(b"\n") + 1
    bad = _append(root, {"op": "version", "id": foreign, "stance": "s", "number": number})
    before = snapshot(root)

    # fsck names it (line and record) and fails; it changes nothing.
    result = _invoke(root, "fsck")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"refs.log line {line_no}" in errors[0] and foreign in errors[0] and why in errors[0]
    assert "--rebuild-catalog" in errors[0]
    assert snapshot(root) == before

    # A write names it too, with the advice that works, and changes nothing.
    line = one_line(_invoke(root, "tag", "s@1", "first"))
    assert f"refs.log line {line_no}" in line and why in line and "fsck --rebuild-catalog" in line
    assert snapshot(root) == before

    # The rebuild sets it aside where the user can read it, and indexes the rest.
    result = _invoke(root, "fsck", "--rebuild-catalog")
    assert result.exit_code == 0, result.output
    assert f"set aside in refs.log.rejected: refs.log line {line_no}" in result.output
    assert (root / "refs.log").read_bytes() == good_log
    kept = [json.loads(x) for x in (root / "refs.log.rejected").read_bytes().splitlines()]
    assert kept == [{"line": line_no, "reason": kept[0]["reason"], "record": bad.decode().rstrip("\n")}]
    assert why in kept[0]["reason"]

    # No loop: the store is whole, writes work, fsck is clean.
    assert _invoke(root, "tag", "s@1", "first").exit_code == 0
    result = _invoke(root, "fsck")
    assert result.exit_code == 0 and "ok" in result.output, result.output
    with Store.open(root) as s:
        assert [v.ref for v in s.log("s")] == ["s@1"]
        assert s.resolve("s@1").id != foreign


def test_records_of_the_wrong_shape_are_set_aside_too(world, tmp_path):
    store, foreign = _store_with_a_foreign_version(world, tmp_path)
    root = store.root
    store.close()
    good_log = (root / "refs.log").read_bytes()
    for record in ({"op": "version", "id": foreign, "stance": ["s"], "number": 2},
                   {"op": "tag", "stance": "s", "name": {"x": 1}, "version": foreign, "created": "now"},
                   {"op": "version", "id": foreign, "stance": "s", "number": "2"}):
        _append(root, record)
    assert _invoke(root, "fsck").exit_code == 1
    result = _invoke(root, "fsck", "--rebuild-catalog")
    assert result.exit_code == 0, result.output
    assert result.output.count("set aside in refs.log.rejected") == 3
    assert (root / "refs.log").read_bytes() == good_log
    assert _invoke(root, "tag", "s@1", "first").exit_code == 0


# -- 4. base records agree with their tensor list, and with the weights where they are at hand ---


def _object_file(payload: bytes) -> bytes:
    from deltastore.repo.objects import FORMAT_VERSION, HEADER, MAGIC, RAW

    return HEADER.pack(MAGIC, FORMAT_VERSION, RAW, 0, len(payload)) + payload


def _serve_base_record(url: str, base_id: str, change) -> bytes:
    """Replace the remote's base record of `base_id` by `change(record)`; returns the new record."""
    from deltastore.core.hashing import bytes_id

    remote = Remote(url)
    ref = json.loads(remote.fs.cat_file(remote.base_path(base_id)))
    rec = json.loads(remote.get_object(ref["record"], None)[1])
    change(rec)
    record = canonical_json(rec)
    _write(remote, remote.object_path(bytes_id(record)), _object_file(record))
    _write(remote, remote.base_path(base_id), canonical_json({**ref, "record": bytes_id(record)}) + b"\n")
    return record


def _inflate_norms(rec: dict) -> None:
    for t in rec["tensors"]:
        if t["sq_norm"] is not None:
            t["sq_norm"] *= 1e12


def _unrelated_model(pair, tmp_path: Path) -> Path:
    """A model of the base's shapes that is no fine-tune of it: a fresh random init."""
    gen = torch.Generator().manual_seed(7)
    state = {n: torch.randn(t.shape, generator=gen).to(t.dtype) * t.float().std().clamp_min(0.02).to(t.dtype)
             for n, t in pair.base_state.items()}
    return write_folder(tmp_path / "unrelated", state)


def _sq_norms(store: Store, base: str) -> dict[str, float]:
    return {n: r["sq_norm"] for n, r in store.base_tensors(base).items()}


def test_a_lying_base_record_from_a_remote_is_replaced_by_base_add(world, tmp_path):
    pair, fts, a = world
    url = f"file://{tmp_path / 'remote'}"
    push(a, ["s@1"], url)
    bid = a.base("tiny").id
    _serve_base_record(url, bid, _inflate_norms)
    store, _ = clone(url, tmp_path / "clone")
    root = store.root
    with store:
        assert _sq_norms(store, bid) != _sq_norms(a, bid)  # the lie passes every check the list allows
    other = _unrelated_model(pair, tmp_path)
    with Store.open(root) as store:  # the lie hides that this is no fine-tune of the base
        assert store.commit("x", other, base=bid, base_weights=pair.base).tensors_stored > 0
        store.delete_stance("x")
    result = _invoke(root, "base", "add", str(pair.base))
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "disagreed with its weights" in notes[0] and "replaced" in notes[0], result.stderr
    with Store.open(root) as store:
        assert _sq_norms(store, bid) == _sq_norms(a, bid)
        # A commit measures changes against the true norms: a threshold of 0.001 keeps tensors.
        kept = store.commit("t", fts[1], base=bid, min_rel_change=0.001)
        assert kept.tensors_stored == a.commit("u", fts[1], base="tiny", min_rel_change=0.001).tensors_stored > 0
        a.delete_stance("u")
        with pytest.raises(NotAFineTune):
            store.commit("x", other, base=bid)
    # The correction is in the truth: a rebuild keeps it, and fsck finds nothing wrong.
    assert _invoke(root, "fsck", "--rebuild-catalog", "--read-data").exit_code == 0
    with Store.open(root) as store:
        assert _sq_norms(store, bid) == _sq_norms(a, bid)
    # Registering the same weights again keeps the record (a base add appends its ref record
    # whatever it changes: only the log's position moves).
    before = snapshot(root)
    result = _invoke(root, "base", "add", str(pair.base))
    assert result.exit_code == 0 and "note:" not in result.output
    after = snapshot(root)
    assert {t for t in after[0] if after[0][t] != before[0][t]} == {"state"} and after[1] == before[1]


def test_a_commit_given_the_weights_replaces_a_lying_record(world, tmp_path):
    pair, fts, a = world
    url = f"file://{tmp_path / 'remote'}"
    push(a, ["s@1"], url)
    bid = a.base("tiny").id
    _serve_base_record(url, bid, _inflate_norms)
    store, _ = clone(url, tmp_path / "clone")
    result = _invoke(store.root, "commit", "t", str(fts[1]), "--base", str(pair.base), "--min-rel-change", "0.001")
    store.close()
    assert result.exit_code == 0, result.output
    assert "disagreed with its weights" in result.stderr
    with Store.open(tmp_path / "clone" / ".deltastore") as store:
        assert _sq_norms(store, bid) == _sq_norms(a, bid)
        assert store.resolve("t@1").tensors


def test_fsck_read_data_finds_a_record_its_weights_contradict(world, tmp_path):
    """A base record replaced by hand (a new record object, a base ref record naming it)."""
    pair, _, _ = world
    root = tmp_path / "store"
    with Store.init(root) as store:
        store.add_base(pair.base, name="tiny")
        last = json.loads((root / "refs.log").read_bytes().splitlines()[-1])
        rec = json.loads(store.objects.get(last["record"]))
        _inflate_norms(rec)
        lie = store.objects.put(canonical_json(rec)).id
    _append(root, {**last, "record": lie})
    assert _invoke(root, "fsck", "--rebuild-catalog").exit_code == 0  # the lie agrees with its tensor list
    result = _invoke(root, "fsck", "--read-data")
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad-base-record" in errors[0] and "base add" in errors[0], result.output
    assert _invoke(root, "base", "add", str(pair.base)).exit_code == 0
    assert _invoke(root, "fsck", "--read-data").exit_code == 0


def _bytes_off_by_one(rec: dict) -> None:
    rec["bytes"] += 1


def _negative_norm(rec: dict) -> None:
    rec["tensors"][0]["sq_norm"] = -1.0


def _shape_changed(rec: dict) -> None:
    rec["tensors"][0]["shape"] = [7, 7]


@pytest.mark.parametrize("change", [_bytes_off_by_one, _negative_norm, _shape_changed],
                         ids=["bytes-off-by-one", "negative-squared-norm", "shape-not-its-bytes"])
def test_a_base_record_that_contradicts_its_tensor_list_is_refused(world, tmp_path, change):
    pair, _, a = world
    url = f"file://{tmp_path / 'remote'}"
    push(a, ["s@1"], url)
    bid = a.base("tiny").id
    _serve_base_record(url, bid, change)
    with Store.init(tmp_path / "victim") as victim:
        before = snapshot(victim.root)
        with pytest.raises(RemoteDataRejected, match="not the record of base"):
            pull(victim, url)
        assert snapshot(victim.root) == before
    line = one_line(CliRunner().invoke(cli, ["clone", url, str(tmp_path / "clone")]))
    assert "not the record of base" in line
    assert not (tmp_path / "clone").exists()


def test_a_wrong_base_record_in_the_log_is_named_and_set_aside(world, tmp_path):
    """A base ref record written by hand naming a record its tensor list contradicts (here its
    `bytes`): the base keeps the record it has; fsck and a write name the line; the rebuild
    sets it aside."""
    pair, _, _ = world
    root = tmp_path / "store"
    with Store.init(root) as store:
        store.add_base(pair.base, name="tiny")
        last = json.loads((root / "refs.log").read_bytes().splitlines()[-1])
        rec = json.loads(store.objects.get(last["record"]))
        rec["bytes"] += 1
        wrong = store.objects.put(canonical_json(rec)).id
    good_log = (root / "refs.log").read_bytes()
    _append(root, {**last, "record": wrong})
    before = snapshot(root)
    result = _invoke(root, "fsck")
    assert result.exit_code == 1 and "refs.log line 2" in result.output and "bytes" in result.output, result.output
    line = one_line(_invoke(root, "base", "add", str(pair.base)))
    assert "refs.log line 2" in line and "fsck --rebuild-catalog" in line
    assert snapshot(root) == before
    result = _invoke(root, "fsck", "--rebuild-catalog")
    assert result.exit_code == 0 and "set aside in refs.log.rejected: refs.log line 2" in result.output, result.output
    assert (root / "refs.log").read_bytes() == good_log
    assert _invoke(root, "base", "add", str(pair.base)).exit_code == 0
