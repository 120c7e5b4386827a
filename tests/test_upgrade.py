"""`deltastore upgrade`: a store of format 1 (manifests and refs only in its catalog) becomes a
store of format 2 in place, giving the same log, show, stats and exports; killed at any of its
steps, it leaves a store that is of format 1 or 2 and that `upgrade` finishes."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from deltastore import Store
from deltastore.repo.catalog import now
from deltastore.repo.catalog_schema import FORMAT_1_SCHEMA
from deltastore.core.errors import OldStoreFormat

from helpers import run_cli
from test_catalog_truth import history, ok, said  # noqa: F401 (a fixture)


def downgrade(root: Path) -> None:
    """Write the store as format 1 wrote it: every manifest and ref in the catalog only."""
    with Store.open(root, readonly=True) as store:
        cat = store.catalog
        bases = cat.bases()
        tensors = [t for b in bases for t in cat.base_tensors(b["id"])]
        versions = cat.query("SELECT * FROM versions ORDER BY key")
        manifests = {v["id"]: store.objects.get(v["id"]).decode() for v in versions}
        stances, tags, metadata = cat.query("SELECT * FROM stances"), cat.tags(), cat.metadata_rows()
        index_objects = set(manifests) | {b["id"] for b in bases} | {b["record"] for b in bases}
    for oid in index_objects:
        path = root / "objects" / oid[3:5] / oid[5:]
        path.unlink()
    for name in ("catalog.db", "catalog.db-wal", "catalog.db-shm", "refs.log"):
        (root / name).unlink(missing_ok=True)
    shutil.rmtree(root / "journals")
    db = sqlite3.connect(root / "catalog.db")
    db.execute("CREATE TABLE migrations (number INTEGER PRIMARY KEY, applied TEXT NOT NULL)")
    for number, script in enumerate(FORMAT_1_SCHEMA, start=1):
        db.executescript(script)
        db.execute("INSERT INTO migrations VALUES (?, ?)", [number, now()])
    for b in bases:
        db.execute("INSERT INTO bases VALUES (?, ?, ?, ?, ?, ?, ?)",
                   [b[k] for k in ("id", "name", "tensor_count", "bytes", "source", "hub_id", "created")])
    for t in tensors:
        db.execute("INSERT INTO base_tensors (base_id, name, dtype, shape, tensor_id, sq_norm) VALUES (?, ?, ?, ?, ?, ?)",
                   [t[k] for k in ("base_id", "name", "dtype", "shape", "tensor_id", "sq_norm")])
    for s in stances:
        db.execute("INSERT INTO stances VALUES (?, ?)", [s["name"], s["created"]])
    for v in versions:
        db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   [v[k] for k in ("id", "stance", "number", "parent", "base_id", "encoding", "message", "created",
                                   "tensors", "bytes")] + [manifests[v["id"]]])
    for t in tags:
        db.execute("INSERT INTO tags VALUES (?, ?, ?, ?)", [t["stance"], t["name"], t["version_id"], t["created"]])
    for m in metadata:
        db.execute("INSERT INTO metadata VALUES (?, ?, ?)", [m["version_id"], m["key"], m["value"]])
    db.commit()
    db.close()
    (root / "STORE").write_text(json.dumps({"format": "deltastore/store/1"}) + "\n")


@pytest.fixture(scope="module")
def old_store(history, tmp_path_factory):
    source, refs, seen, _ = history
    root = tmp_path_factory.mktemp("old") / "store"
    shutil.copytree(source, root)
    downgrade(root)
    return root, refs, seen


def test_every_command_on_a_format_1_store_says_to_upgrade(old_store, tmp_path) -> None:
    root = tmp_path / "store"
    shutil.copytree(old_store[0], root)
    for args in (["log"], ["stats"], ["gc"], ["fsck"], ["fsck", "--rebuild-catalog"]):
        result = run_cli(root, *args)
        assert result.exit_code == 1 and "deltastore upgrade" in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1
    with pytest.raises(OldStoreFormat):
        Store.open(root)


def test_upgrade_gives_the_same_store(old_store, tmp_path) -> None:
    source, refs, seen = old_store
    root = tmp_path / "store"
    shutil.copytree(source, root)
    result = run_cli(root, "upgrade")
    assert result.exit_code == 0 and "7 versions, 2 bases" in result.output, result.output
    assert said(root, refs, tmp_path / "exports") == seen
    with Store.open(root) as store:
        report = store.fsck(read_data=True)
        # Objects only the deleted stance needed wait for gc, as they did in format 1.
        assert report.ok and report.kinds() == {"unreferenced-object"}
        store.gc()
        assert store.fsck(read_data=True).problems == ()


# The steps of an upgrade that touch the disk, in order; a child is killed at the k-th.
KILLER = r"""
import os, sys
from pathlib import Path
from deltastore import upgrade
from deltastore.repo import index, journalfiles, objects, reflog

steps = [0]
stop = int(sys.argv[2])

def step(fn):
    def wrapper(*args, **kwargs):
        steps[0] += 1
        if steps[0] == stop:
            os._exit(9)
        out = fn(*args, **kwargs)
        steps[0] += 1
        if steps[0] == stop:
            os._exit(9)
        return out
    return wrapper

objects.ObjectStore.put = step(objects.ObjectStore.put)
journalfiles.write = step(journalfiles.write)
reflog.RefLog.write_all = step(reflog.RefLog.write_all)
index.build = step(index.build)
index.install = step(index.install)
upgrade.os.replace = step(os.replace)
upgrade.upgrade(Path(sys.argv[1]))
print(steps[0])
"""


def test_an_upgrade_killed_at_any_step_is_finished_by_running_it_again(old_store, tmp_path) -> None:
    import subprocess
    import sys

    source, refs, seen = old_store
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    whole = subprocess.run([sys.executable, str(script), str(tmp_path / "none"), "0"], capture_output=True, text=True,
                           env=env)
    assert whole.returncode != 0  # no store there: the script itself works
    root = tmp_path / "probe"
    shutil.copytree(source, root)
    total = int(subprocess.run([sys.executable, str(script), str(root), "0"], capture_output=True, text=True,
                               env=env, check=True).stdout)
    moments = sorted({max(1, round(total * (k + 0.5) / 10)) for k in range(10)})
    assert len(moments) == 10
    for k in moments:
        root = tmp_path / f"kill-{k}"
        shutil.copytree(source, root)
        done = subprocess.run([sys.executable, str(script), str(root), str(k)], capture_output=True, text=True,
                              env=env)
        assert done.returncode == 9, done.stderr
        fmt = json.loads((root / "STORE").read_text())["format"]
        if fmt == "deltastore/store/1":
            assert "deltastore upgrade" in run_cli(root, "log").output
        else:
            assert fmt == "deltastore/store/2"
        assert run_cli(root, "upgrade").exit_code == 0
        assert said(root, refs, tmp_path / f"exports-{k}") == seen
        with Store.open(root) as store:
            assert store.fsck().ok
