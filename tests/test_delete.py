"""`deltastore delete REF`: one version that nothing needs goes, recorded in the ref log (a
"drop" record) so that a rebuilt catalog says what the live one says; its number is never
given again; what needs it (a tag, a patched folder, a version stored against it, being its
stance's only version) refuses the delete, by name, and changes nothing. And
`examples/smollm.py --stance NAME --out DIR`: one stance into a folder the user names."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from deltastore import Store
from deltastore.repo.objects import ObjectStore

from helpers import file_bytes, make_model, run_cli, run_json, store_snapshot, views, write_folder


def variant(pair, tmp_path, seed: int):
    gen = torch.Generator().manual_seed(seed)
    state = {n: t.clone() for n, t in pair.base_state.items()}
    state["head.weight"] = state["head.weight"] + 0.01 * torch.randn(state["head.weight"].shape, generator=gen)
    return write_folder(tmp_path / f"variant-{seed}", state)


@pytest.fixture
def three(tmp_path):
    """s@1..s@3, s@1 tagged `first`."""
    pair = make_model(tmp_path)
    root = tmp_path / "store"
    with Store.init(root) as store:
        for seed in (1, 2, 3):
            store.commit("s", variant(pair, tmp_path, seed), base=pair.base, tag="first" if seed == 1 else None)
    return root, pair


def test_deleting_the_newest_keeps_its_number_and_gc_frees_its_objects(three, tmp_path):
    root, pair = three
    with Store.open(root) as store:
        gone = store.resolve("s@3")
    objects_before = sorted(ObjectStore(root).ids())
    out = run_json(root, "delete", "s@3")
    assert (out["ref"], out["id"], out["newest"]) == ("s@3", gone.id, "s@2") and out["bytes_only_here"] > 0
    assert sorted(ObjectStore(root).ids()) == objects_before  # delete itself frees nothing
    with Store.open(root) as store:
        assert [v.ref for v in store.log("s")] == ["s@2", "s@1"]
        assert store.resolve("s").ref == "s@2"
        # s@3 named that version; it never names another one.
        new = store.commit("s", variant(pair, tmp_path, 4), base=pair.base)
        assert new.version.ref == "s@4" and new.version.parent == store.resolve("s@2").id
    assert run_cli(root, "show", "s@3").exit_code != 0
    assert run_cli(root, "gc").exit_code == 0
    assert not ObjectStore(root).exists(gone.id)  # gc freed its manifest (and what only it held)
    assert run_json(root, "fsck")["ok"]


def test_the_catalog_rebuilds_to_the_same_state_after_deletes(three, tmp_path):
    root, pair = three
    assert run_cli(root, "delete", "s@2").exit_code == 0
    assert run_cli(root, "delete", "s@3").exit_code == 0
    assert run_cli(root, "gc").exit_code == 0  # the dropped manifests are gone: replay must not need them
    commands = [("log",), ("stances",), ("stats",), ("show", "s@1")]
    live_rows, live = store_snapshot(root)[0], views(root, commands)
    assert run_cli(root, "fsck", "--rebuild-catalog").exit_code == 0
    assert store_snapshot(root)[0] == live_rows
    assert views(root, commands) == live
    with Store.open(root) as store:
        assert store.commit("s", variant(pair, tmp_path, 5), base=pair.base).version.ref == "s@4"
    # And after deleting the oldest: the stance's creation time is its oldest version's, both ways.
    assert run_cli(root, "tag", "--delete", "s@first").exit_code == 0
    assert run_cli(root, "delete", "s@1").exit_code == 0
    live = views(root, commands[:3]), _stance_rows(root)
    assert run_cli(root, "fsck", "--rebuild-catalog").exit_code == 0
    # (Not the rows' internal keys: a rebuild numbers the versions' rows afresh.)
    assert (views(root, commands[:3]), _stance_rows(root)) == live
    assert run_json(root, "fsck")["ok"]


def _stance_rows(root):
    rows = store_snapshot(root)[0]
    return rows["stances"], [r for r in rows["state"] if "top:" in r]


def test_a_rename_keeps_the_numbers_given(three, tmp_path):
    root, pair = three
    assert run_cli(root, "delete", "s@3").exit_code == 0
    assert run_cli(root, "stance", "rename", "s", "t").exit_code == 0
    with Store.open(root) as store:
        assert store.commit("t", variant(pair, tmp_path, 6), base=pair.base).version.ref == "t@4"


def refused(root, ref, *needles):
    before = store_snapshot(root), (root / "refs.log").read_bytes()
    result = run_cli(root, "delete", ref)
    assert result.exit_code == 1, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1
    for n in needles:
        assert n in message, message
    assert (store_snapshot(root), (root / "refs.log").read_bytes()) == before


def test_what_needs_a_version_refuses_its_delete_by_name(three, tmp_path):
    root, pair = three
    refused(root, "s@1", "nothing was changed", "tag s@first points at it", "deltastore tag --delete s@first")
    target = tmp_path / "patched"
    shutil.copytree(pair.base, target)
    assert run_cli(root, "apply", "s@2", str(target)).exit_code == 0
    refused(root, "s@2", f"{target} is patched with it", "deltastore revert")
    with Store.open(root) as store:
        store.commit("c", variant(pair, tmp_path, 7), base=pair.base, against="s@3", new_stance=True)
    refused(root, "s@3", "c@1 is stored against it")
    refused(root, "c@1", "the only version of c", "deltastore stance delete c")
    refused(root, "s@9", "no version matches 's@9'")
    assert run_cli(root, "revert", str(target)).exit_code == 0
    assert run_cli(root, "delete", "s@2").exit_code == 0


# -- examples/smollm.py: one stance, into folders the user names ---------------------------------


def test_smollm_example_takes_one_stance_into_named_folders(tmp_path, capsys):
    """Options and folder naming only: a --quick run takes about 2 minutes here even with the
    model and fine-tune cached (it loads the model and generates answers to compare)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import smollm
    finally:
        sys.path.pop(0)
    out, base_out = tmp_path / "models" / "ft-curious", tmp_path / "models" / "smollm2"
    args = smollm.parse_args(["--stance", "curious-uncertainty", "--out", str(out), "--base-out", str(base_out),
                              "--quick"])
    assert smollm.chosen_stances(args) == ["curious-uncertainty"] and args.quick
    assert smollm.chosen_stances(smollm.parse_args([])) == list(smollm.stances()["stances"])

    # The cached folder (named by its recipe's hash) is copied whole under the user's name.
    cached = write_folder(tmp_path / "cache" / "curious-uncertainty-e2-lr2e-05-s0-quick-09f10180",
                          {"w": torch.ones(3)})
    (cached / "training.json").write_text("{}")
    assert smollm.copy_out(cached, args.out) == out
    assert file_bytes(out) == file_bytes(cached)
    assert os.stat(out / "model.safetensors").st_nlink == 1  # a copy: apply in place refuses hard links
    assert smollm.copy_out(cached, None) == cached

    # Refused before any work, in one line, exit status 2 (argparse's).
    for argv, said in [(["--stance", "nosuch"], "invalid choice: 'nosuch'"),
                       (["--out", str(tmp_path / "x")], "--out needs --stance"),
                       (["--stance", "curious-uncertainty", "--out", str(out)], f"--out {out} exists"),
                       (["--base-out", str(out)], f"--base-out {out} exists"),
                       (["--stance", "curious-uncertainty", "--out", str(tmp_path / "y"),
                         "--base-out", str(tmp_path / "y")], "name the same folder")]:
        with pytest.raises(SystemExit) as e:
            smollm.parse_args(argv)
        assert e.value.code == 2 and said in capsys.readouterr().err


def test_a_pull_does_not_give_a_deleted_number_again(three, tmp_path):
    """The remote still holds s@3 after it is deleted here: pulling brings it back, as a fetch
    brings back what git deleted locally, but under a new number, never under s@3."""
    from deltastore.sharing.remote import pull, push

    root, _ = three
    url = (tmp_path / "remote").as_uri()
    with Store.open(root) as store:
        push(store, ["s"], url)
        gone = store.resolve("s@3").id
    assert run_cli(root, "delete", "s@3").exit_code == 0
    with Store.open(root) as store:
        pull(store, url)
        assert store.resolve("s@4").id == gone
        assert store.catalog.version_at("s", 3) is None


def test_a_version_from_elsewhere_never_lands_on_a_deleted_number(three, tmp_path):
    """A Hub pull or an ingest keeps the other store's numbers: another s@3 is refused after
    s@3 was deleted here; the deleted version itself may come back as s@3."""
    from deltastore.core.errors import VersionConflict

    root, pair = three
    other = tmp_path / "other"
    with Store.init(other) as there:
        for seed in (11, 12, 13):
            there.commit("s", variant(pair, tmp_path, seed), base=pair.base)
        theirs = there.resolve("s@3")
        manifest, payload = theirs.manifest(), (lambda oid, size: there.objects.get(oid, raw_size=size))
        with Store.open(root) as store:
            ours = store.resolve("s@3")
            ours_manifest = ours.manifest()
            ours_objects = {o.id: store.objects.get(o.id, raw_size=o.size) for e in ours.tensors
                            for o in e.objects.values()}
        assert run_cli(root, "delete", "s@3").exit_code == 0
        before = store_snapshot(root), (root / "refs.log").read_bytes()
        with Store.open(root) as store:
            with pytest.raises(VersionConflict, match="s@3 was another version, deleted here"):
                store.ingest([manifest], payload)
        assert (store_snapshot(root), (root / "refs.log").read_bytes()) == before
    with Store.open(root) as store:
        assert store.ingest([ours_manifest], lambda oid, size: ours_objects[oid])[0][0].ref == "s@3"


def test_a_deleted_number_stays_taken_when_its_stance_is_renamed(three, tmp_path):
    """s@3 deleted, then s renamed t: t@3 still names the deleted version, so another version
    from elsewhere (a Hub pull into t, an ingest) is refused there, as it is before the rename;
    the stance's other numbers move with it."""
    from deltastore.core.errors import VersionConflict

    root, pair = three
    other = tmp_path / "other"
    with Store.init(other) as there:
        for seed in (11, 12, 13):
            there.commit("t", variant(pair, tmp_path, seed), base=pair.base)
        theirs = there.resolve("t@3")
        manifest = theirs.manifest()
        objects = {o.id: there.objects.get(o.id, raw_size=o.size) for e in theirs.tensors for o in e.objects.values()}
    assert run_cli(root, "delete", "s@3").exit_code == 0
    assert run_cli(root, "stance", "rename", "s", "t").exit_code == 0
    before = store_snapshot(root), (root / "refs.log").read_bytes()
    with Store.open(root) as store:
        with pytest.raises(VersionConflict, match="t@3 was another version, deleted here"):
            store.ingest([manifest], lambda oid, size: objects[oid])
    assert (store_snapshot(root), (root / "refs.log").read_bytes()) == before
