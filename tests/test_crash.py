"""kill -9 at any moment of a commit, or of a gc, leaves a store that fsck finds clean, in
which every version landed before exports bit for bit, and whose catalog a rebuild from the
objects and refs reproduces."""

from __future__ import annotations

import shutil
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from deltastore import Store

from helpers import ForkDriver, assert_same_state, index_object_ids, load_folder, make_model, write_folder

KILLS = 10

# What a forked child does with a job: a commit or a gc.
JOBS = r"""
from deltastore import Store
from deltastore.engine.maintenance import gc

def run(job):
    with Store.open(job["store"]) as store:
        if job["do"] == "commit":
            store.commit(job["stance"], job["model"], base=job["base"], message=job["message"])
        else:
            gc(store, batch=job["batch"])
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A store with a base of ~60 tensors (a commit writes one object per changed tensor, each
    fsynced, so its run is long enough to be killed at ten distinct moments), and the driver."""
    tmp = tmp_path_factory.mktemp("crash")
    pair = make_model(tmp, layers=8, hidden=96)
    with Store.init(tmp / "store") as store:
        base = store.add_base(pair.base, name="tiny").id
    driver = ForkDriver(tmp, JOBS)
    yield tmp, pair, base, driver
    driver.close()


def fine_tune(tmp: Path, pair, seed: int) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    state = {n: t + 1e-3 * torch.randn(t.shape, generator=gen) for n, t in pair.base_state.items()}
    return write_folder(tmp / "models" / f"ft-{seed}", state), state


def object_files(root: Path) -> list[Path]:
    return list((root / "objects").glob("*/*"))


def check_store(root: Path, tmp: Path, expected: dict[str, dict[str, torch.Tensor]], stance: str) -> list:
    """fsck finds no error; the stance's versions are numbered 1..N, each one of the expected
    models, and each exports bit for bit."""
    with Store.open(root) as store:
        report = store.fsck()
        assert report.ok, report.errors
        everything = store.log()
        log = store.log(stance) if store.catalog.has_stance(stance) else []
        assert sorted(v.number for v in log) == list(range(1, len(log) + 1))
        for v in log:
            out = tmp / "exports" / f"{v.id[3:15]}-{time.monotonic_ns()}"
            assert_same_state(load_folder(store.export(v, out)), expected[v.message])
    # The catalog is what a rebuild from the objects and refs gives.
    copy = tmp / "rebuilt" / str(time.monotonic_ns())
    shutil.copytree(root, copy)
    Store.rebuild_catalog(copy)
    with Store.open(copy) as rebuilt:
        assert rebuilt.log() == everything and rebuilt.fsck().ok
    shutil.rmtree(copy)
    return log


def test_a_commit_killed_at_any_moment_leaves_a_clean_store(setup) -> None:
    tmp, pair, base, driver = setup
    root = tmp / "store"
    expected: dict[str, dict[str, torch.Tensor]] = {}
    model, expected["ref"] = fine_tune(tmp, pair, 0)
    # How long one whole commit takes here (of a model whose objects are all new), so that
    # the kills below spread over all of it.
    duration = driver.run(do="commit", store=str(root), stance="ref", model=str(model), base=base, message="ref")

    killed, landed = 0, 0
    leftovers: set[str] = set()  # what the killed commits left, seen right after each kill

    def kill_one(k: int, kill) -> None:
        nonlocal killed, landed
        model, expected[f"m{k}"] = fine_tune(tmp, pair, k + 1)
        before = len(check_store(root, tmp, expected, "s"))
        killed += kill(do="commit", store=str(root), stance="s", model=str(model), base=base, message=f"m{k}")
        after = check_store(root, tmp, expected, "s")
        assert len(after) in (before, before + 1)  # the version landed whole, or not at all
        landed += len(after) - before
        with Store.open(root) as store:
            leftovers.update(store.fsck().kinds())

    for k in range(KILLS):
        kill_one(k, partial(driver.kill_after, duration * (k + 0.5) / KILLS))
    assert killed >= KILLS // 2, f"only {killed} of {KILLS} kills found the commit running"
    # A loaded machine stretches a commit's phases unevenly, so the spread above may miss the
    # moments when objects are being written. These kills wait for the commit's first new
    # object, and for a third of them, so they land mid-way through its object writes whatever
    # the load (every kill is checked as above either way).
    tensors = len(pair.base_state)
    for k, written in enumerate((1, tensors // 3), start=KILLS):
        count = len(object_files(root))
        kill_one(k, partial(driver.kill_when, lambda: len(object_files(root)) >= count + written, 30 * duration))

    # What the killed commits left is harmless, and repair plus gc clear it.
    with Store.open(root) as store:
        store.fsck(repair=True)
        store.gc()
        assert store.fsck(read_data=True).problems == ()
        # The stance goes on from where it is, numbers without gaps.
        model, expected["after"] = fine_tune(tmp, pair, 99)
        v = store.commit("s", model, base=base, message="after").version
        assert v.number == landed + 1
    assert leftovers & {"unreferenced-object", "tmp-file", "stale-pending"}
    assert len(check_store(root, tmp, expected, "s")) == landed + 1
    check_store(root, tmp, expected, "ref")


def test_gc_killed_at_any_moment_leaves_a_clean_store(setup) -> None:
    tmp, pair, base, driver = setup
    root = tmp / "gc-store"
    expected: dict[str, dict[str, torch.Tensor]] = {}
    with Store.init(root) as store:
        store.add_base(pair.base, name="tiny")
        for k in range(2):
            model, expected[f"keep{k}"] = fine_tune(tmp, pair, 200 + k)
            store.commit("keep", model, base="tiny", message=f"keep{k}")

    def garbage(round_: int) -> int:
        """A stance sharing an object with `keep`, deleted: objects for gc to remove (and
        nothing else: what an earlier killed gc left goes first)."""
        with Store.open(root) as store:
            store.gc()
            for k in range(2):
                model, _ = fine_tune(tmp, pair, 300 + 2 * round_ + k)
                store.commit(f"scratch{round_}", model, base="tiny")
            store.commit(f"scratch{round_}", tmp / "models" / "ft-200", base="tiny")
            store.delete_stance(f"scratch{round_}")
            return len(store.gc_plan().objects)

    # Small batches: a run of several write transactions, each to be killed in its middle.
    assert garbage(0) > 100
    duration = driver.run(do="gc", store=str(root), batch=25)
    killed = 0
    for k in range(KILLS):
        garbage(k + 1)
        killed += driver.kill_after(duration * (k + 0.5) / KILLS, do="gc", store=str(root), batch=25)
        check_store(root, tmp, expected, "keep")
    assert killed >= KILLS // 2, f"only {killed} of {KILLS} kills found gc running"

    with Store.open(root) as store:
        store.gc()
        assert store.fsck(read_data=True).problems == ()
        # Every object file is a version's manifest, a base's list or record, or has its row.
        assert store.catalog.query("SELECT count(*) AS n FROM objects")[0]["n"] == \
            len(set(store.objects.ids()) - index_object_ids(root))
    check_store(root, tmp, expected, "keep")
