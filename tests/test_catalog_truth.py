"""The store's truth lives in its objects and its ref log; the catalog is an index that can be
rebuilt from them. A catalog lost, emptied or damaged never costs a version: every command
refuses with one line naming the rebuild, gc deletes nothing, and the rebuild gives back the
same stances, versions, numbers, tags, metadata, bases and sizes."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from deltastore import Store

from helpers import make_model, object_files, run_cli, run_json, views, write_folder

REBUILD = "fsck --rebuild-catalog"


def variant(pair, tmp_path: Path, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    state = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in pair.base_state.items()}
    return write_folder(tmp_path / f"variant-{seed}", state)


@pytest.fixture
def small(tmp_path):
    """A store with one base and two versions of one stance."""
    pair = make_model(tmp_path)
    root = tmp_path / "store"
    with Store.init(root) as store:
        store.add_base(pair.base, name="tiny")
        for seed in (1, 2):
            store.commit("s", variant(pair, tmp_path, seed), base="tiny")
    return root


def assert_refused(result) -> None:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and REBUILD in lines[0], result.output


def test_an_emptied_catalog_makes_every_command_refuse_and_gc_delete_nothing(small) -> None:
    objects = object_files(small)
    (small / "catalog.db").write_bytes(b"")
    for wal in ("catalog.db-wal", "catalog.db-shm"):
        (small / wal).unlink(missing_ok=True)
    assert_refused(run_cli(small, "log"))
    assert_refused(run_cli(small, "gc"))
    assert_refused(run_cli(small, "fsck"))
    assert object_files(small) == objects
    assert (small / "catalog.db").read_bytes() == b""  # a read created nothing


def test_a_deleted_catalog_is_not_created_again_by_a_read(small) -> None:
    for name in ("catalog.db", "catalog.db-wal", "catalog.db-shm"):
        (small / name).unlink(missing_ok=True)
    assert_refused(run_cli(small, "log"))
    assert_refused(run_cli(small, "gc"))
    assert not (small / "catalog.db").exists()


def test_gc_never_frees_an_object_a_manifest_needs_when_index_rows_are_lost(small) -> None:
    objects = object_files(small)
    with sqlite3.connect(small / "catalog.db") as db:
        db.execute("DELETE FROM entry_objects")
    result = run_cli(small, "gc")
    assert result.exit_code == 1 and REBUILD in result.output, result.output
    assert object_files(small) == objects


# -- the catalog lost or damaged in every way, on a store with some history ----------------------


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """3 stances and 7 versions left after a rename and a delete, 2 tags, metadata, 2 bases; and
    what the commands said of it (log, show of every version, stats, every export)."""
    tmp = tmp_path_factory.mktemp("history")
    pair = make_model(tmp)
    other = make_model(tmp, seed=7, name="other")
    root = tmp / "store"
    with Store.init(root) as store:
        store.add_base(pair.base, name="tiny")
        store.add_base(other.base, name="other", hub_id="org/other")
        for n in range(3):
            store.commit("curious", variant(pair, tmp, 10 + n), base="tiny", message=f"c{n}",
                         metadata={"lr": "1e-4", "epoch": str(n)}, tag="best" if n == 1 else None)
        for n in range(2):
            store.commit("confident", variant(pair, tmp, 20 + n), base="tiny", encoding="int8")
        store.commit("scratch", variant(pair, tmp, 30), base="tiny")
        store.delete_stance("scratch")
        store.commit("plain", variant(other, tmp, 40), base="other", metadata={"who": "é"})
        store.commit("plain", variant(other, tmp, 41), base="other")
        store.tag("plain@1", "first")
        store.rename_stance("confident", "sure")
        refs = [f"{v.stance}@{v.number}" for v in store.log()]
    assert len(refs) == 7
    seen = said(root, refs, tmp / "exports-before")
    return root, refs, seen, tmp


def said(root: Path, refs: list[str], exports: Path) -> dict:
    out = dict(zip(["log", "stances", "bases", "stats"],
                   views(root, [("log",), ("stances",), ("base", "list"), ("stats",)])))
    for ref in refs:
        out[f"show {ref}"] = run_json(root, "show", ref)
        folder = exports / ref
        ok(root, "export", ref, "--out", str(folder))
        out[f"export {ref}"] = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                                if p.is_file()}
    return out


def ok(root: Path, *args: str) -> str:
    result = run_cli(root, *args)
    assert result.exit_code == 0, result.output
    return result.stdout


def flip_random_bytes(path: Path, count: int, seed: int) -> None:
    data = bytearray(path.read_bytes())
    gen = torch.Generator().manual_seed(seed)
    for offset in torch.randint(100, len(data), (count,), generator=gen).tolist():
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def damage(root: Path, how: str) -> None:
    db = root / "catalog.db"
    if how == "deleted":
        for name in ("catalog.db", "catalog.db-wal", "catalog.db-shm"):
            (root / name).unlink(missing_ok=True)
    elif how == "emptied":
        db.write_bytes(b"")
    elif how == "truncated":
        db.write_bytes(db.read_bytes()[:db.stat().st_size // 2])
    elif how == "flipped":
        flip_random_bytes(db, 20, seed=14)


@pytest.mark.parametrize("how", ["deleted", "emptied", "truncated", "flipped"])
def test_a_lost_or_damaged_catalog_is_refused_everywhere_and_rebuilt_to_what_it_was(history, tmp_path, how) -> None:
    source, refs, seen, _ = history
    root = tmp_path / "store"
    shutil.copytree(source, root)
    objects = {p: p.read_bytes() for p in object_files(root)}
    damage(root, how)
    for args in (["log"], ["log", "--json"], ["stances"], ["show", refs[0]], ["stats"], ["base", "list"],
                 ["export", refs[0], "--out", str(tmp_path / "out")], ["tag", refs[0], "x"], ["stance", "delete", "plain"],
                 ["gc"], ["gc", "--dry-run"], ["fsck"]):
        result = run_cli(root, *args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, result.output)
        lines = result.output.strip().splitlines()
        assert REBUILD in lines[-1] and not any("Traceback" in line for line in lines), (args, result.output)
        if args != ["fsck"]:
            assert len(lines) == 1, (args, result.output)
    assert {p: p.read_bytes() for p in object_files(root)} == objects  # gc deleted nothing

    rebuilt = run_cli(root, "fsck", "--rebuild-catalog")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "7 versions in 3 stances, 2 bases" in rebuilt.output
    assert said(root, refs, tmp_path / "exports-after") == seen
    assert ok(root, "gc", "--dry-run", "--json") and Store.open(root).fsck(read_data=True).ok


HOLDER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("SELECT count(*) FROM versions").fetchone()
print("holding", flush=True)
sys.stdin.readline()
"""


def test_a_write_ahead_log_deleted_while_another_process_holds_it(history, tmp_path) -> None:
    """The catalog then lacks what the log held: it is refused, never read as if whole, and
    the rebuild gives back everything."""
    import subprocess
    import sys

    source, refs, seen, _ = history
    root = tmp_path / "store"
    shutil.copytree(source, root)
    objects = {p: p.read_bytes() for p in object_files(root)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root / "catalog.db")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        # Ref changes whose rows are only in the write-ahead log while the holder keeps it open.
        ok(root, "tag", "plain@2", "second")
        ok(root, "tag", "--delete", "plain@second")
        assert (root / "catalog.db-wal").stat().st_size > 0
        (root / "catalog.db-wal").unlink()
        for args in (["log", "--json"], ["stances"], ["show", refs[0]], ["stats"], ["gc"], ["fsck"]):
            # SQLite finds the shared index of a log that is not there: one line, the rebuild.
            assert_refused(run_cli(root, *args))
        assert {p: p.read_bytes() for p in object_files(root)} == objects  # gc deleted nothing
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert run_cli(root, "fsck", "--rebuild-catalog").exit_code == 0
    assert said(root, refs, tmp_path / "exports-after") == seen


def test_a_catalog_behind_the_ref_log_catches_up_on_open(small, tmp_path) -> None:
    """What a writer that died between its log append and its catalog commit leaves (or an old
    copy of the catalog put back): the next writable open replays what the catalog lacks."""
    with Store.open(small) as store:
        store.catalog.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        versions = store.log()
    old = (small / "catalog.db").read_bytes()
    pair = make_model(tmp_path, name="again")
    with Store.open(small) as store:
        store.tag("s@1", "kept")
        store.rename_stance("s", "t")
        landed = store.commit("t", variant(pair, tmp_path, 3), base="tiny").version
        expected = [(v.ref, v.id, v.tags) for v in store.log()]
    for name in ("catalog.db-wal", "catalog.db-shm"):
        (small / name).unlink(missing_ok=True)
    (small / "catalog.db").write_bytes(old)
    with Store.open(small, readonly=True) as store:
        assert [v.id for v in store.log()] == [v.id for v in versions]  # a reader sees the older state
    with Store.open(small) as store:
        assert [(v.ref, v.id, v.tags) for v in store.log()] == expected
        assert store.resolve("t").id == landed.id and store.fsck().ok


def test_a_ref_log_that_lost_records_is_refused_and_not_rebuilt_from(small) -> None:
    log = small / "refs.log"
    log.write_bytes(log.read_bytes()[:-1].rsplit(b"\n", 1)[0] + b"\n")  # the last record gone
    result = run_cli(small, "log")
    assert result.exit_code == 1 and "refs.log" in result.output and "restore it from a backup" in result.output
    assert len(result.output.strip().splitlines()) == 1
    rebuilt = run_cli(small, "fsck", "--rebuild-catalog")
    assert rebuilt.exit_code == 1 and "would lose versions" in rebuilt.output
    assert (small / "catalog.db").stat().st_size > 0


def test_a_torn_last_record_is_ignored_and_cut_off_by_the_next_writer(small) -> None:
    log = small / "refs.log"
    whole = log.read_bytes()
    log.write_bytes(whole + b'{"op":"tag","stance":"s"')  # a writer died inside its append
    assert run_cli(small, "log").exit_code == 0
    with Store.open(small) as store:
        store.tag("s@1", "after")
        assert store.resolve("s@after").number == 1
    assert log.read_bytes().startswith(whole) and log.read_bytes().endswith(b"\n")
    assert b'"stance":"s"{' not in log.read_bytes()
    assert run_cli(small, "fsck").exit_code == 0


def test_the_ref_log_records_each_change_as_canonical_json(small) -> None:
    """FORMAT.md §6: one canonical-JSON record per line, in commit order."""
    from deltastore.core.hashing import canonical_json

    with Store.open(small) as store:
        store.tag("s@1", "good")
        store.untag("s@good")
        store.rename_stance("s", "t")
        store.delete_stance("t")
    lines = (small / "refs.log").read_bytes().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    assert all(line == canonical_json(r) + b"\n" for line, r in zip(lines, records))
    assert [r["op"] for r in records] == ["base", "version", "version", "tag", "untag", "rename", "delete"]
    assert set(records[0]) == {"op", "id", "record", "name", "source", "hub_id", "created"}
    assert [(r["stance"], r["number"]) for r in records[1:3]] == [("s", 1), ("s", 2)]
    assert records[5:] == [{"op": "rename", "old": "s", "new": "t"}, {"op": "delete", "stance": "t"}]


def test_gc_refuses_without_the_ref_log(small) -> None:
    objects = object_files(small)
    (small / "refs.log").unlink()
    result = run_cli(small, "gc")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert object_files(small) == objects


class _CtrlCAfterCommit:
    """The store's SQLite connection, with a Ctrl-C arriving the moment a COMMIT returns (a
    KeyboardInterrupt between COMMIT and the end of the transaction's block: seen once in a
    real Ctrl-C test, forced here). Everything else goes to the real connection."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn
        self.armed = False

    def execute(self, sql, *args):
        out = self._conn.execute(sql, *args)
        if self.armed and sql == "COMMIT":
            self.armed = False
            raise KeyboardInterrupt
        return out

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_a_ctrl_c_right_after_the_catalog_commits_keeps_the_ref_log_record(small) -> None:
    """The transaction used to undo its ref-log append on any exception, also after COMMIT had
    landed: the catalog then indexed a record the log no longer held, and every later command
    called the log truncated. Fails before the fix in catalog.transaction."""
    with Store.open(small) as store:
        wrapped = _CtrlCAfterCommit(store.catalog.conn)
        store.catalog.conn = wrapped
        wrapped.armed = True
        with pytest.raises(KeyboardInterrupt):
            store.tag("s@1", "paper")
        store.catalog.conn = wrapped._conn
    assert run_json(small, "show", "s@paper")["number"] == 1
    assert run_cli(small, "fsck").exit_code == 0
    refs = (small / "refs.log").read_bytes().splitlines()
    assert json.loads(refs[-1]).get("tag") == "paper" or b"paper" in refs[-1]


def test_a_checkpoint_killed_part_way_is_replayed_not_called_truncated(small, tmp_path) -> None:
    """A writer killed while it checkpoints may have written the catalog's first page (whose
    header counts the pages the log adds) and not yet the pages past the file's old end. The
    write-ahead log still holds every one of them and SQLite replays it on the next open, so the
    catalog is whole, not truncated. CI saw this after an apply was killed."""
    db = small / "catalog.db"
    with Store.open(small) as store:
        store.catalog.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    holder = sqlite3.connect(db, isolation_level=None)  # keeps the store's close from checkpointing
    try:
        holder.execute("SELECT count(*) FROM versions").fetchone()
        with Store.open(small) as store:
            for seed in range(3, 9):
                store.commit("grown", variant(make_model(tmp_path / f"m{seed}"), tmp_path, seed), base="tiny")
        copy = tmp_path / "copy"
        shutil.copytree(small, copy)
    finally:
        holder.close()
    wal = (copy / "catalog.db-wal").read_bytes()
    page_size = int.from_bytes(wal[8:12], "big")
    frames = [wal[32 + k * (24 + page_size):32 + (k + 1) * (24 + page_size)]
              for k in range((len(wal) - 32) // (24 + page_size))]
    first_page = [f[24:] for f in frames if int.from_bytes(f[:4], "big") == 1][-1]
    with open(copy / "catalog.db", "r+b") as f:  # the checkpoint got as far as page 1
        f.write(first_page)
    size = (copy / "catalog.db").stat().st_size
    assert size < int.from_bytes(first_page[28:32], "big") * page_size  # what the kill left

    with Store.open(copy) as store:
        assert [v.number for v in store.log("grown")] == [6, 5, 4, 3, 2, 1]
        assert store.fsck().ok
