"""A disk that fills up: each write (commit, in-place apply, pull, gc) fails with one line and
cleans up after itself without a second error; reads and revert work while the disk is full;
once space is freed, fsck finds the store clean. The store lives on a small tmpfs."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from deltastore import Store

from helpers import file_bytes, make_model, run_cli, write_folder

FULL = "No space left on device: free space, then run the command again"


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def one_line_full(result) -> None:
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [f"Error: {FULL}"], result.output


def variant(pair, tmp_path: Path, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    state = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in pair.base_state.items()}
    return write_folder(tmp_path / f"variant-{seed}", state)


def test_a_full_disk_fails_each_write_with_one_line_and_leaves_a_clean_store(small_disk, tmp_path) -> None:
    pair = make_model(tmp_path, layers=4, hidden=64)
    root = small_disk / "store"
    with Store.init(root) as store:
        store.add_base(pair.base, name="tiny")
        store.commit("s", variant(pair, tmp_path, 1), base="tiny")
    other_root = tmp_path / "other"  # on a disk with room: where a pull's versions come from
    with Store.init(other_root) as other:
        other.add_base(pair.base, name="tiny")
        pulled = other.commit("p", variant(pair, tmp_path, 3), base="tiny").version
    applied = tmp_path / "applied"
    shutil.copytree(pair.base, applied)
    assert run_cli(root, "apply", "s", str(applied)).exit_code == 0
    log_before = run_cli(root, "log", "--json").stdout

    filler = fill(small_disk)
    one_line_full(run_cli(root, "commit", "s", str(variant(pair, tmp_path, 2)), "--base", "tiny"))
    target = tmp_path / "target"
    shutil.copytree(pair.base, target)
    result = run_cli(root, "apply", "s", str(target))
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert file_bytes(target) == file_bytes(pair.base)
    with Store.open(root) as store, Store.open(other_root) as other:
        # A pull lands its versions through ingest.
        with pytest.raises(OSError) as e:
            store.ingest([pulled.manifest()], lambda oid, size: other.objects.get(oid))
        assert str(e.value) == FULL
    result = run_cli(root, "gc")
    assert result.exit_code in (0, 1) and len(result.output.strip().splitlines()) <= 2, result.output
    # Reads and revert work on the full disk.
    assert run_cli(root, "log", "--json").stdout == log_before
    assert run_cli(root, "show", "s").exit_code == 0
    reverted = run_cli(root, "revert", str(applied))
    assert reverted.exit_code == 0, reverted.output
    assert file_bytes(applied) == file_bytes(pair.base)

    filler.unlink()
    with Store.open(root) as store:
        report = store.fsck(read_data=True)
        assert report.ok, report.errors
        store.fsck(repair=True)
        store.gc()
        assert store.fsck().problems == ()
        assert store.commit("s", variant(pair, tmp_path, 2), base="tiny").version.number == 2


LIMITED = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from cli.main import main
sys.argv = ["deltastore"] + sys.argv[2:]
main()
"""


def test_a_file_size_limit_fails_a_commit_with_one_line_and_leaves_a_clean_store(tmp_path) -> None:
    """Where no tmpfs can be mounted: a file-size limit, as a quota gives, fails writes the same way."""
    import sys

    pair = make_model(tmp_path)
    root = tmp_path / "store"
    with Store.init(root) as store:
        store.add_base(pair.base, name="tiny")
        store.commit("s", variant(pair, tmp_path, 1), base="tiny")
    before = run_cli(root, "log", "--json").stdout
    limited = subprocess.run([sys.executable, "-c", LIMITED, "65536", "--store", str(root), "commit", "s",
                              str(variant(pair, tmp_path, 2)), "--base", "tiny"], capture_output=True, text=True)
    assert limited.returncode == 1 and limited.stderr.strip().splitlines() == [f"Error: {FULL}"], limited.stderr
    assert run_cli(root, "log", "--json").stdout == before
    with Store.open(root) as store:
        assert store.fsck(read_data=True).ok
        store.fsck(repair=True)
        store.gc()
        assert store.fsck().problems == ()
