"""Hostile input at the limits: each case is refused with an error of its own type and message,
quickly, in bounded memory (under 100 MB above where it started), and leaves the store as it
was. The cases: a header that declares 10^12 elements, a zstd frame that expands past its
declared size, a manifest of a million entries, and tensor names that are 100 kB long or hold
path separators, '..', NUL or control characters."""

from __future__ import annotations

import json
import resource
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
import zstandard

from deltastore import CorruptObject, DeltastoreError, ModelFormatError, Store, UnsafeInput
from deltastore.core.hashing import canonical_json
from deltastore.repo.objects import HEADER, MAGIC, ZSTD
from deltastore.repo.records import MAX_TENSORS, check_manifest, parse_manifest

from helpers import store_snapshot

MB = 1 << 20
LIMIT = 100 * MB


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def hostile(store: Store, error: type[DeltastoreError], match: str, call, *args, seconds: float = 10, **kwargs):
    """`call` must raise `error` with `match` in its one-line message, within `seconds`, without
    allocating more than LIMIT (Python and numpy by tracemalloc; the process's peak RSS must not
    grow by more either), and leave the store's files and rows as they were."""
    before = store_snapshot(store.root)
    rss = max_rss()
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(error) as e:
            call(*args, **kwargs)
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(e.value)
    assert match in message, message
    assert isinstance(e.value, DeltastoreError) and "\n" not in message
    assert peak < LIMIT, f"allocated {peak} bytes"
    assert max_rss() - rss < LIMIT, f"the peak RSS grew by {max_rss() - rss} bytes"
    assert elapsed < seconds, f"took {elapsed:.1f} s"
    assert store_snapshot(store.root) == before
    return e.value


def base_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(64, 32, generator=g), "norm.weight": torch.randn(32, generator=g),
            "head.weight": torch.randn(64, 32, generator=g)}


@pytest.fixture
def store(tmp_path):
    """A store with a base (a file on disk) and one lossless version of a fine-tune of it."""
    base = base_state()
    from safetensors.torch import save_file

    save_file(base, tmp_path / "base.safetensors")
    ft = {k: v + 0.01 for k, v in base.items()}
    with Store.init(tmp_path / "store") as s:
        s.add_base(tmp_path / "base.safetensors", name="base")
        s.commit("stance", ft, base="base")
        yield s


def safetensors_file(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def object_of(store: Store, name: str):
    """The object holding tensor `name`'s delta in the stance's version."""
    (o,) = store.resolve("stance").entry(name).objects.values()
    return o


# -- a header that declares 10^12 elements ------------------------------------------------------------


@pytest.mark.parametrize("offsets", [[0, 4], [0, 4 * 10**12]], ids=["short-data", "declared-data"])
def test_a_safetensors_header_declaring_a_trillion_elements(store, tmp_path, offsets):
    f = safetensors_file(tmp_path / "huge.safetensors",
                         {"embed.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": offsets}},
                         b"\0" * 4)
    hostile(store, ModelFormatError, "needs 4000000000000 bytes", store.add_base, f)
    hostile(store, ModelFormatError, "needs 4000000000000 bytes", store.commit, "stance", f, base="base")


def test_an_object_declaring_a_trillion_bytes(store, tmp_path):
    o = object_of(store, "embed.weight")
    path = store.objects.path(o.id)
    body = zstandard.ZstdCompressor().compress(b"\0" * 1000)
    path.write_bytes(HEADER.pack(MAGIC, 1, ZSTD, 0, 10**12) + body)
    hostile(store, CorruptObject, f"declares 1000000000000 bytes, expected {o.size}",
            store.export, "stance", tmp_path / "out")
    # Read with no expected size (as fsck and gc may): refused from the header alone.
    hostile(store, CorruptObject, "impossible size", store.objects.get, o.id)
    assert not (tmp_path / "out").exists()


def test_a_pulled_manifest_declaring_a_trillion_elements(store):
    m = store.resolve("stance").manifest()
    m["tensors"][0]["shape"] = [10**6, 10**6]
    hostile(store, UnsafeInput, "is more than 1099511627776 bytes", store.ingest, [m], _no_payloads)
    # int8 fits the byte bound: the base says what shape the tensor has.
    m["tensors"][0]["dtype"] = "I8"
    hostile(store, UnsafeInput, "only a raw lossless entry may change a tensor's shape", store.ingest, [m],
            _no_payloads)


def test_an_empty_tensor_with_a_dimension_past_any_bound(store, tmp_path):
    # Zero elements, so no byte count catches the other dimension (found by tests/fuzz).
    f = safetensors_file(tmp_path / "empty.safetensors",
                         {"embed.weight": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}})
    hostile(store, ModelFormatError, "malformed shape", store.add_base, f)
    m = store.resolve("stance").manifest()
    m["tensors"][0]["shape"] = [0, 2**70]
    hostile(store, UnsafeInput, "malformed shape", store.ingest, [m], _no_payloads)


def _no_payloads(object_id: str, size: int) -> bytes:
    raise AssertionError("a refused manifest must be refused before its payloads are read")


# -- a zstd frame that expands past its declared size -------------------------------------------------


def zstd_bomb(expands_to: int) -> bytes:
    """Frames of zeros: some 40 kB of zstd per GiB."""
    frame = zstandard.ZstdCompressor(level=3).compress(bytes(64 * MB))
    return frame * (expands_to // (64 * MB))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return zstd_bomb(1 << 30)


def test_a_zstd_frame_expanding_far_past_its_declared_size(store, tmp_path, bomb):
    o = object_of(store, "embed.weight")
    store.objects.path(o.id).write_bytes(HEADER.pack(MAGIC, 1, ZSTD, 0, o.size) + bomb)
    # A GiB behind a header that declares the object's real size: refused once one byte more
    # than declared has come out.
    hostile(store, CorruptObject, f"decompresses to more bytes, header declares {o.size}",
            store.export, "stance", tmp_path / "out", seconds=5)
    report = store.fsck(read_data=True)
    assert [p.kind for p in report.problems if p.subject == o.id] == ["corrupt-object"]


def test_a_zstd_frame_declaring_more_than_zstd_can_hold(store, bomb):
    o = object_of(store, "embed.weight")
    path = store.objects.path(o.id)
    # 1 GiB of output needs some 32 kB of zstd at the very least; 10^12 bytes needs 30 MB.
    path.write_bytes(HEADER.pack(MAGIC, 1, ZSTD, 0, 10**12) + bomb)
    hostile(store, CorruptObject, "impossible size", store.objects.get, o.id)


# -- a manifest of a million entries -----------------------------------------------------------------


def manifest_head(store: Store) -> dict:
    m = store.resolve("stance").manifest()
    m["tensors"] = []
    return m


def test_a_manifest_text_of_a_million_entries_is_refused_before_parsing(store):
    head = canonical_json(manifest_head(store))
    # The same entry a million times over: it is refused before it could matter that the names repeat.
    entries = b",".join([b'{"name":"layers.0.weight"}'] * 1_000_000)
    text = head.replace(b'"tensors":[]', b'"tensors":[' + entries + b"]")
    hostile(store, UnsafeInput, "JSON objects and lists, more than the", parse_manifest, text, seconds=5)


def test_a_parsed_manifest_of_a_million_entries_is_refused_before_its_entries_are_read(store):
    m = manifest_head(store)
    entry = store.resolve("stance").manifest()["tensors"][0]
    m["tensors"] = [entry] * 1_000_000  # one entry a million times: cheap to build, not to check
    hostile(store, UnsafeInput, f"1000000 tensor entries, more than the {MAX_TENSORS} allowed",
            check_manifest, m, seconds=5)
    hostile(store, UnsafeInput, f"more than the {MAX_TENSORS} allowed", store.ingest, [m], _no_payloads, seconds=5)


def test_a_pulled_manifest_file_of_a_million_entries_is_not_read(store, tmp_path):
    from deltastore.sharing.hubchecks import read_pulled
    from deltastore.sharing.hubindex import MAX_MANIFEST_BYTES
    from deltastore.core.errors import PulledDataRejected

    entry = canonical_json(store.resolve("stance").manifest()["tensors"][0])
    path = tmp_path / "v1.json"
    with open(path, "wb") as f:
        f.write(b'{"tensors":[' + entry)
        # A million entries, as a sparse file: what it holds past the bound is never read.
        f.truncate(len(entry) * 1_000_000)
    hostile(store, PulledDataRejected, "larger than 67108864 bytes", read_pulled, path, MAX_MANIFEST_BYTES,
            "user/repo", None, "stance/v1.json")


def test_a_safetensors_header_of_a_million_tensors_is_refused_before_parsing(store, tmp_path):
    entry = b'"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    raw = b"{" + b",".join([entry] * 1_000_000) + b"}"
    f = tmp_path / "many.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    del raw
    hostile(store, ModelFormatError, "JSON objects and lists, more than the", store.add_base, f)


def test_a_shard_index_of_a_million_tensors_is_refused_before_parsing(store, tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    entry = b'"model.layers.0.weight":"model-00001-of-00002.safetensors"'
    (folder / "model.safetensors.index.json").write_bytes(b'{"weight_map":{' + b",".join([entry] * 1_000_000) + b"}}")
    hostile(store, ModelFormatError, "is larger than 16777216 bytes", store.add_base, folder)


# -- names that could escape a folder -----------------------------------------------------------------

BAD_NAMES = {
    "100kB": "w" * 100_000, "slash": "a/b.weight", "backslash": "a\\b.weight", "dotdot": "..",
    "dotdot-inside": "a..b.weight", "nul": "a\x00b", "newline": "a\nb", "escape": "a\x1b[2Jb", "del": "a\x7f",
    "c1": "a\x85b", "surrogate": "a\udc80b",
}


def name_error(name: str) -> str:
    return "names must be 1 to 1024" if len(name) > 1024 else \
        "lone surrogate" if "\udc80" in name else "path separator, '..' or a control character"


@pytest.mark.parametrize("kind", list(BAD_NAMES))
def test_a_bad_tensor_name_in_a_safetensors_file(store, tmp_path, kind):
    name = BAD_NAMES[kind]
    f = safetensors_file(tmp_path / "bad.safetensors",
                         {name: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    hostile(store, UnsafeInput, name_error(name), store.add_base, f)
    hostile(store, UnsafeInput, name_error(name), store.commit, "stance", f, base="base")


@pytest.mark.parametrize("kind", list(BAD_NAMES))
def test_a_bad_tensor_name_in_a_state_dict(store, kind):
    name = BAD_NAMES[kind]
    hostile(store, UnsafeInput, name_error(name), store.add_base, {name: torch.zeros(2)})


@pytest.mark.parametrize("kind", list(BAD_NAMES))
def test_a_bad_tensor_or_part_name_in_a_pulled_manifest(store, kind):
    name = BAD_NAMES[kind]
    m = store.resolve("stance").manifest()
    m["tensors"][0]["name"] = name
    hostile(store, UnsafeInput, name_error(name), store.ingest, [m], _no_payloads)
    m = store.resolve("stance").manifest()
    objects = m["tensors"][0]["objects"]
    objects[name] = objects.pop(next(iter(objects)))
    hostile(store, UnsafeInput, name_error(name), store.ingest, [m], _no_payloads)


@pytest.mark.parametrize("shard", ["../model.safetensors", "/etc/model.safetensors", "a\\b.safetensors", "x\x00.safetensors"])
def test_a_shard_index_naming_a_file_outside_its_folder(store, tmp_path, shard):
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"embed.weight": shard}}))
    hostile(store, UnsafeInput, "path separator, '..' or a control character", store.add_base, folder)


# -- a store on a read-only folder, and stores side by side ----------------------------------------------

READ_ONLY_SCRIPT = r"""
import json, sys
from click.testing import CliRunner
from deltastore.cli.main import cli  # as installed: the script runs outside the checkout

store, out, target, model = sys.argv[1:5]
runs = {
    "log": ["log", "--json"], "stances": ["stances", "--json"], "show": ["show", "stance", "--json"],
    "stats": ["stats", "--json"], "fsck": ["fsck", "--read-data", "--json"], "base list": ["base", "list", "--json"],
    "diff": ["diff", "stance@1", "stance@2", "--json"], "gc dry-run": ["gc", "--dry-run", "--json"],
    "export": ["export", "stance@1", "--out", out, "--json"],
    "commit": ["commit", "stance", model, "--base", "base"], "tag": ["tag", "stance", "t"],
    "gc": ["gc"], "base add": ["base", "add", model], "apply": ["apply", "stance", target],
    "revert": ["revert", target], "fsck --repair": ["fsck", "--repair"],
    "stance delete": ["stance", "delete", "stance"],
}
results = {}
for name, args in runs.items():
    r = CliRunner().invoke(cli, ["--store", store, *args])
    results[name] = [r.exit_code, r.stdout, r.stderr]
print(json.dumps(results))
"""


def _drop_file_capabilities() -> None:
    """As root, permissions bind only without these: drop them (from the bounding set, which
    the exec'd interpreter's capabilities are cut to) so that a read-only folder is one."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_a_store_on_a_read_only_folder_reads_and_refuses_writes(store, tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    base = base_state()
    ft2 = {k: v - 0.01 for k, v in base.items()}
    save_file(ft2, tmp_path / "ft2.safetensors")
    store.commit("stance", tmp_path / "ft2.safetensors", base="base")
    target = tmp_path / "target.safetensors"
    target.write_bytes((tmp_path / "base.safetensors").read_bytes())
    store.close()
    before = store_snapshot(store.root)
    files = sorted(p for p in store.root.rglob("*"))
    for p in files + [store.root]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        r = subprocess.run([sys.executable, "-c", READ_ONLY_SCRIPT, str(store.root), str(tmp_path / "out"),
                            str(target), str(tmp_path / "ft2.safetensors")],
                           capture_output=True, text=True, cwd=tmp_path,
                           preexec_fn=_drop_file_capabilities if os.geteuid() == 0 else None)
    except subprocess.SubprocessError:  # root, in a sandbox that forbids dropping capabilities
        pytest.skip("cannot make a folder read-only for root here")
    finally:
        for p in files + [store.root]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    for name in ("log", "stances", "show", "stats", "fsck", "base list", "diff", "gc dry-run", "export"):
        code, out, err = results[name]
        assert code == 0, f"{name}: {err}"
        json.loads(out)
    assert [v["number"] for v in json.loads(results["log"][1])] == [2, 1]
    assert json.loads(results["fsck"][1])["ok"]
    assert list((tmp_path / "out").glob("*.safetensors"))
    for name in ("commit", "tag", "gc", "base add", "apply", "revert", "fsck --repair", "stance delete"):
        code, out, err = results[name]
        assert code == 1, f"{name} exited {code}: {out} {err}"
        assert err.count("\n") == 1 and "is read-only" in err and "Traceback" not in err, f"{name}: {err}"
    assert store_snapshot(store.root) == before
    assert target.read_bytes() == (tmp_path / "base.safetensors").read_bytes()


def test_two_stores_never_share_temporary_files(tmp_path, monkeypatch):
    """Two handles on one store and a third store elsewhere commit the same fine-tune at once:
    every object goes through a temporary file of its own, in its own store's tmp/."""
    import os
    import threading

    import deltastore.repo.objects as objects_module

    renames: list[tuple[Path, Path]] = []
    lock = threading.Lock()
    real_replace = os.replace

    def recording_replace(src, dst, *args, **kwargs):
        # The stores' own files (the per-user list of stores lives elsewhere).
        if str(src).endswith(".tmp") and tmp_path in Path(dst).parents:
            with lock:
                renames.append((Path(src), Path(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(objects_module.os, "replace", recording_replace)
    base = base_state()
    ft = {k: v + 0.5 for k, v in base.items()}
    roots = [tmp_path / "a", tmp_path / "a", tmp_path / "b"]
    for root in {r for r in roots}:
        with Store.init(root) as s:
            s.add_base(base, name="base")
    stores = [Store.open(r) for r in roots]
    errors = []

    def commit(s: Store, k: int) -> None:
        try:
            s.commit(f"stance{k}", ft, base="base", base_weights=base, encoding="int8", force=True)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(s, k)) for k, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    temporaries = [src for src, _ in renames]
    assert temporaries and len(set(temporaries)) == len(temporaries)
    for src, dst in renames:
        # objects/ab/cdef... (or trusted.json, base add's cache) and tmp/<pid>-<random>.tmp of the same store
        store = dst.parent if dst.name == "trusted.json" else dst.parent.parent.parent
        assert src.parent.name == "tmp" and src.parent.parent == store
        assert src.name.startswith(f"{os.getpid()}-")
    for s in stores:
        assert not list((s.root / "tmp").iterdir())
        assert s.fsck().ok
        s.close()


# -- an adapter whose patterns would take the regex engine forever ---------------------------------------


@pytest.mark.parametrize("pattern", ["((.*)*)*z", "(a+)+$", "(e|e)*x", "(.)\\1", ".*a.*b.*c"])
def test_an_adapter_pattern_that_backtracks_without_bound(store, tmp_path, pattern):
    from deltastore.exports.lora import LoraError, export_lora, import_lora

    ft = {k: v + torch.randn(v.shape) * 0.01 for k, v in base_state().items()}
    store.commit("stance", ft, base="base")
    out = tmp_path / "adapter"
    export_lora(store, "stance", out, rank=2)
    config = json.loads((out / "adapter_config.json").read_text())
    # PEFT matches these keys as regexes against each module name: this one, against a name of
    # some 30 characters, would backtrack for longer than anyone waits.
    config["rank_pattern"] = {pattern: config["r"]}
    (out / "adapter_config.json").write_text(json.dumps(config))
    hostile(store, LoraError, "give module names", import_lora, store, out, "imported", base="base", seconds=5)


# -- arguments that are not UTF-8 ------------------------------------------------------------------------

BAD = "x\udcff"  # what Python makes of the byte 0xff in a command line


@pytest.mark.parametrize("args", [
    ["commit", "stance", "{ft}", "--base", "base", "-m", BAD], ["commit", "stance", "{ft}", "--base", "base", "--meta", f"k={BAD}"],
    ["commit", "stance", "{ft}", "--base", "base", "--include", BAD], ["base", "add", "{ft}", "--hub-id", BAD],
    ["show", BAD], ["log", "--where", f"k={BAD}"], ["export", BAD, "--out", "{out}"], ["stance", "delete", BAD],
], ids=["message", "meta", "include", "hub-id", "show", "where", "export", "stance-delete"])
def test_arguments_that_are_not_utf8_are_one_line_errors(store, tmp_path, args):
    from click.testing import CliRunner

    from cli.main import cli

    ft = tmp_path / "ft.safetensors"
    from safetensors.torch import save_file

    save_file({k: v * 2 for k, v in base_state().items()}, ft)
    args = [a.format(ft=ft, out=tmp_path / "out") for a in args]
    before = store_snapshot(store.root)
    r = CliRunner().invoke(cli, ["--store", str(store.root), *args])
    assert r.exit_code == 1, r.output
    assert r.stderr.count("\n") == 1 and "UTF-8" in r.stderr and "Traceback" not in r.stderr
    assert store_snapshot(store.root) == before


# -- a catalog edited by hand ----------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", ["garbage", "[]", "[" * 100_000, '{"format": "deltastore/version/1"}'])
def test_a_manifest_object_replaced_by_hand(store, tmp_path, manifest):
    from deltastore.repo.objects import ObjectStore

    # A well-formed object file, holding other content than its name (the version id) says.
    vid = store.resolve("stance").id
    other = ObjectStore(tmp_path / "other")
    (tmp_path / "other" / "tmp").mkdir(parents=True)
    forged = other.put(manifest.encode())
    store.objects.path(vid).write_bytes(other.path(forged.id).read_bytes())
    hostile(store, DeltastoreError, "is corrupt", store.resolve, "stance")
    hostile(store, DeltastoreError, "is corrupt", store.export, "stance", tmp_path / "out")
    assert not store.fsck().ok


def test_an_adapter_with_ten_thousand_pattern_keys(store, tmp_path):
    from deltastore.exports.lora import LoraError, export_lora, import_lora

    ft = {k: v + torch.randn(v.shape) * 0.01 for k, v in base_state().items()}
    store.commit("stance", ft, base="base")
    out = tmp_path / "adapter"
    export_lora(store, "stance", out, rank=2)
    config = json.loads((out / "adapter_config.json").read_text())
    # Each a regex to compile and to match against every module: refused before either.
    config["alpha_pattern"] = {f"k{i}": 2 for i in range(10_000)}
    (out / "adapter_config.json").write_text(json.dumps(config))
    hostile(store, LoraError, "holds 10000 regular expressions, more than the 1024 read", import_lora, store, out,
            "imported", base="base", seconds=5)
    # Module names as export-lora writes them are looked up, however many there are.
    config["alpha_pattern"] = {"^" + f"layers\\.{i}\\.mlp": 2 for i in range(10_000)}
    (out / "adapter_config.json").write_text(json.dumps(config))
    start = time.monotonic()
    import_lora(store, out, "imported", base="base")
    assert time.monotonic() - start < 10
