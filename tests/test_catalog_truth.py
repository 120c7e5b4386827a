"""The store's truth lives in its objects and its ref log; the catalog is an index that can be
rebuilt from them. A catalog lost, emptied or damaged never costs a version: every command
refuses with one line naming the rebuild, gc deletes nothing, and the rebuild gives back the
same stances, versions, numbers, tags, metadata, bases and sizes."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from deltastore import Store

from helpers import make_model, object_files, write_folder

REBUILD = "fsck --rebuild-catalog"


def run(root: Path, *args: str):
    return CliRunner().invoke(cli, ["--store", str(root), *args])


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
    assert_refused(run(small, "log"))
    assert_refused(run(small, "gc"))
    assert_refused(run(small, "fsck"))
    assert object_files(small) == objects
    assert (small / "catalog.db").read_bytes() == b""  # a read created nothing


def test_a_deleted_catalog_is_not_created_again_by_a_read(small) -> None:
    for name in ("catalog.db", "catalog.db-wal", "catalog.db-shm"):
        (small / name).unlink(missing_ok=True)
    assert_refused(run(small, "log"))
    assert_refused(run(small, "gc"))
    assert not (small / "catalog.db").exists()


def test_gc_never_frees_an_object_a_manifest_needs_when_index_rows_are_lost(small) -> None:
    objects = object_files(small)
    with sqlite3.connect(small / "catalog.db") as db:
        db.execute("DELETE FROM entry_objects")
    result = run(small, "gc")
    assert result.exit_code == 1 and REBUILD in result.output, result.output
    assert object_files(small) == objects
