"""Big tensors read a block at a time: by commit (blockwise.py), by apply and export (a large
part's sections): the same entries and bytes as a whole read, a damaged object refused with
nothing changed, and peak memory that does not grow with the model's largest tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deltastore import Store
from deltastore.core.errors import CorruptObject
from deltastore.engine import blockwise
from deltastore.metrics.rawnorms import CHUNK
from deltastore.repo import objects
from deltastore.weights import models

from helpers import adam_like, data_object_files, file_bytes, load_folder, write_folder

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pair(tmp_path: Path, dtype: torch.dtype, rows: int = 1024, cols: int = 600) -> tuple[Path, Path]:
    """A base whose large tensor's payloads are several zstd frames (objects.FRAMED_FROM) and a
    fine-tune moving every tensor; a small matrix and a vector as well (one frame each)."""
    gen = torch.Generator().manual_seed(0)
    base = {"embed.weight": torch.randn(rows, cols, generator=gen).to(dtype),
            "proj.weight": torch.randn(40, 24, generator=gen).to(dtype),
            "norm.weight": torch.randn(24, generator=gen).to(dtype)}
    ft = {name: adam_like(t, gen) for name, t in base.items()}
    return write_folder(tmp_path / "base", base), write_folder(tmp_path / "ft", ft)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("encoding", ["lossless", "int8", "int4"])
def test_a_streamed_apply_and_export_write_what_a_whole_read_writes(tmp_path, monkeypatch, dtype, encoding) -> None:
    base, ft = pair(tmp_path, DTYPES[dtype])
    with Store.init(tmp_path / "store") as store:
        store.commit("s", ft, base=base, encoding=encoding)
        whole = tmp_path / "whole"
        os.system(f"cp -r {base} {whole}")
        store.apply_files("s", whole)
        store.export("s", tmp_path / "whole-export")
        monkeypatch.setattr(objects, "STREAM_FROM", 0)  # every part streamed, however small
        streamed = tmp_path / "streamed"
        os.system(f"cp -r {base} {streamed}")
        store.apply_files("s", streamed)
        store.export("s", tmp_path / "streamed-export")
        assert file_bytes(streamed) == file_bytes(whole)
        assert file_bytes(tmp_path / "streamed-export") == file_bytes(tmp_path / "whole-export")
        if encoding == "lossless":
            assert file_bytes(streamed)["model.safetensors"] == (ft / "model.safetensors").read_bytes()
        store.revert_files(streamed)
        assert file_bytes(streamed) == file_bytes(base)


def test_a_mapped_block_holds_whole_chunks_of_every_dtype() -> None:
    # Norms sum CHUNK-element terms: a block boundary inside one would change the figures.
    assert models.MAPPED_BLOCK % (CHUNK * 8) == 0


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("spec, options", [("lossless", {}), ("int8", {}), ("int4", {}),
                                           ("int4", {"group_size": 96}), ("lowrank:8", {})])
@pytest.mark.parametrize("shape", [(1024, 600), (1023, 601)])
def test_a_blockwise_commit_stores_what_a_whole_read_stores(tmp_path, monkeypatch, dtype, spec, options, shape) -> None:
    """Every entry (ids, objects, norms, errors) the same, the large tensor read in 1 MB blocks
    (int8 and int4 encoded as a stream, their results checked slice by slice; groups of 96 make
    slices of three norm chunks; an odd count of elements pads int4's last code byte)."""
    base, ft = pair(tmp_path, DTYPES[dtype], *shape)
    entries = []
    for k, (smallest, block) in enumerate([(blockwise.BLOCKWISE_FROM, models.MAPPED_BLOCK), (0, 1 << 20)]):
        monkeypatch.setattr(blockwise, "BLOCKWISE_FROM", smallest)
        monkeypatch.setattr(models, "MAPPED_BLOCK", block)
        with Store.init(tmp_path / f"store{k}") as store:
            store.add_base(base)
            version = store.commit("s", ft, base=base, encoding=spec, encoding_options=options).version
            entries.append([e.to_manifest() for e in version.tensors])
    assert entries[0] == entries[1]
    assert {e["name"] for e in entries[0]} == {"embed.weight", "proj.weight", "norm.weight"}


@pytest.mark.parametrize("encoding", ["lossless", "int4"])
@pytest.mark.parametrize("where", [0.3, 0.8])
def test_a_damaged_streamed_object_changes_nothing_and_is_named(tmp_path, monkeypatch, encoding, where) -> None:
    base, ft = pair(tmp_path, torch.bfloat16)
    with Store.init(tmp_path / "store") as store:
        store.commit("s", ft, base=base, encoding=encoding)
        target = tmp_path / "target"
        os.system(f"cp -r {base} {target}")
        before = file_bytes(target)
        largest = max(data_object_files(store.root), key=lambda p: p.stat().st_size)
        data = bytearray(largest.read_bytes())
        data[int(len(data) * where)] ^= 0x5A  # inside a zstd block: it decodes wrong, or not at all
        largest.write_bytes(bytes(data))
        monkeypatch.setattr(objects, "STREAM_FROM", 0)
        with pytest.raises(CorruptObject, match=largest.parent.name + largest.name[:6]):
            store.apply_files("s", target)
        assert file_bytes(target) == before
        assert store.catalog.open_journals() == []


def test_a_section_refuses_a_payload_that_ends_early(tmp_path) -> None:
    store = objects.ObjectStore(tmp_path)
    payload = os.urandom(1 << 16) * 40  # compressible: zstd frames, several (FRAMED_FROM)
    put = store.put(payload)
    sections = store.sections(put.id, len(payload), 2)
    got = bytearray(len(payload))
    for k, section in enumerate(sections):
        section.readinto(memoryview(got)[k * len(payload) // 2:(k + 1) * len(payload) // 2])
        section.close()
    assert bytes(got) == payload
    path = store.path(put.id)
    path.write_bytes(path.read_bytes()[:-100])
    # Read from the start, the stream itself ends early; from the middle, the frames no longer
    # parse, and the caller's whole read names the damage.
    [whole] = store.sections(put.id, len(payload), 1)
    with pytest.raises(CorruptObject, match="ends before its declared size|zstd"):
        whole.readinto(bytearray(len(payload)))
    whole.close()
    assert store.sections(put.id, len(payload), 2) is None
    with pytest.raises(CorruptObject):
        store.get(put.id)


RSS_CHILD = textwrap.dedent("""
    import json, sys
    import torch  # (a commit needs it: imported before the figures start, as it weighs 200 MB)
    from deltastore import Store

    def status(key):  # this process's own figures (ru_maxrss would carry the parent's across exec)
        lines = open("/proc/self/status").read().splitlines()
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key + ":"))

    store, target, how = sys.argv[1:4]  # (commit: the fine-tune, and argv[4] its encoding)
    with Store.open(store) as s:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak starts again from what is resident now
        before = status("VmRSS")
        if how == "base add":
            s.add_base(target, name="other")
        elif how == "commit":
            s.commit("s", target, base="base", encoding=sys.argv[4])
        elif how == "apply":
            s.apply_files("s", target)
        else:
            s.export("s", target)
        print(json.dumps({"before": before, "peak": status("VmHWM")}))
""")


@pytest.mark.parametrize("encoding", ["lossless", "int4"])
def test_memory_does_not_grow_with_the_largest_tensor(tmp_path, encoding) -> None:
    """One 268 MB bf16 tensor (an embedding of 134M parameters): commit, apply in place, export
    and base add each add less than a quarter of it to the memory the process held once the store
    was open and torch imported (whole reads added 2.6x it to a lossless commit, 3.8x to int4,
    2.1x to apply, 1x to base add)."""
    rows, cols = 1 << 14, 1 << 13
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(rows, cols, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    base = write_folder(tmp_path / "base", {"embed.weight": embed, "norm.weight": torch.ones(cols, dtype=torch.bfloat16)})
    moved = adam_like(embed, gen)
    del embed
    ft = write_folder(tmp_path / "ft", {"embed.weight": moved, "norm.weight": torch.full((cols,), 1.5).bfloat16()})
    del moved
    with Store.init(tmp_path / "store") as store:
        store.add_base(base, name="base")
    target = tmp_path / "target"
    os.system(f"cp -r {base} {target}")
    tensor_bytes = rows * cols * 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    steps = [("commit", ft), ("apply", target), ("export", tmp_path / "export")]
    for how, where in steps + ([("base add", ft)] if encoding == "lossless" else []):  # (base add: no encoding)
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(tmp_path / "store"), str(where), how, encoding],
                             capture_output=True, text=True, env=env, check=True).stdout
        rss = json.loads(out)
        grew = rss["peak"] - rss["before"]
        # (a commit's first call imports its encoders and writers: about 50 MB, whatever the model)
        bound = tensor_bytes / 4 + (64 << 20 if how == "commit" else 0)
        assert grew < bound, f"{how} grew by {grew / 1e6:.0f} MB for a {tensor_bytes / 1e6:.0f} MB tensor"
    applied, exported = load_folder(target), load_folder(tmp_path / "export")
    assert torch.equal(applied["embed.weight"].view(torch.int16), exported["embed.weight"].view(torch.int16))
    if encoding == "lossless":
        assert (target / "model.safetensors").read_bytes() == (ft / "model.safetensors").read_bytes()
