"""Fuzz targets: one per reader of input from outside, each seeded with valid files.

A target takes an input (file name -> bytes), hands it to the reader as a user or a pulled repo
would, and goes as deep as the input lets it: a manifest that passes its checks is decoded
against real objects, a safetensors file whose header passes has every tensor read. The only
exceptions a target may let out are deltastore's own (`DeltastoreError`); `bound` says how many
bytes it may allocate for an input, from the sizes the input itself declares.

The seeds come from a small store built once (`World`): a base of every shape class (0-d, 1-d,
empty, odd sizes, int8, bf16, fp16), one version per encoding, their objects, Hub payload files
and index, and a PEFT adapter exported from one of them.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import zstandard

from deltastore import Store
from deltastore.core.errors import CorruptObject
from deltastore.core.hashing import bytes_id, canonical_json, tensor_id
from deltastore.weights.models import open_model, write_safetensors, TensorInfo
from deltastore.repo.objects import HEADER, MAGIC, RAW, ZSTD, ObjectStore, compress

Files = dict[str, bytes]
MiB = 1 << 20
REPO = "fuzz/stances"
ENCODINGS = ["lossless", "int8", "int4", "nf4", "fp4", "1bit", "lowrank:2"]


def base_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(24, 16, generator=g),
        "layer.0.attn.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "layer.0.mlp.weight": torch.randn(33, 16, generator=g).to(torch.float16),  # no group fills 64
        "layer.0.norm.weight": torch.randn(16, generator=g),
        "layer.0.scale": torch.randn((), generator=g),
        "layer.0.codes": torch.randint(-100, 100, (4, 5), generator=g, dtype=torch.int8),
        "layer.0.empty": torch.empty(0, 4),
        "head.weight": torch.randn(24, 16, generator=g),
    }


def fine_tune(base: dict[str, torch.Tensor], seed: int, *, grow: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        if t.is_floating_point() and t.numel():
            out[name] = (t.float() + torch.randn(t.shape, generator=g) * 1e-2).to(t.dtype)
        elif t.dtype == torch.int8:
            out[name] = t + 1
        else:
            out[name] = t.clone()
    if grow:  # another shape: stored raw
        out["head.weight"] = torch.cat([out["head.weight"], torch.randn(1, 16, generator=g)])
    return out


class World:
    """Valid files of every kind the readers take, built once under `root`."""

    def __init__(self, root: Path):
        from deltastore.sharing import hub, hubindex

        self.root = Path(root)
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        self.base = base_state()
        self.base_file = self.root / "base.safetensors"
        write_safetensors(self.base_file, [TensorInfo(n, _dtype(t), tuple(t.shape)) for n, t in self.base.items()],
                          lambda n: self.base[n], {"format": "pt"})
        self.store = Store.init(self.root / "store")
        self.store.add_base(self.base_file, name="base")
        self.versions = []
        for k, enc in enumerate(ENCODINGS):
            ft = fine_tune(self.base, seed=k + 1, grow=enc == "lossless")
            stance = "s-" + enc.replace(":", "")
            self.versions.append(self.store.commit(stance, ft, base="base", encoding=enc,
                                                   message=f"seed {enc}", metadata={"k": str(k)}).version)
        self.manifests = [canonical_json(v.manifest()) for v in self.versions]
        self.objects = [p.read_bytes() for p in sorted((self.store.root / "objects").rglob("*")) if p.is_file()]
        self.payloads = []
        for v in self.versions:
            files = hub._version_files(self.store, v, self.root / "hub")
            self.payloads.append({"v.json": files[f"{v.stance}/v{v.number}.json"].read_bytes(),
                                  "v.safetensors": files[f"{v.stance}/v{v.number}.safetensors"].read_bytes()})
        index: dict[str, Any] = {"format": hubindex.INDEX_FORMAT, "bases": {}, "stances": {}}
        for v in self.versions:
            b = self.store.base(v.base_id)
            index["bases"][b.id] = {"name": b.name, "hub_id": "fuzz/base", "tensors": b.tensor_count, "bytes": b.bytes}
            index["stances"].setdefault(v.stance, []).append(hubindex.index_entry(v))
        self.index = json.dumps(index, indent=1, sort_keys=True).encode() + b"\n"
        self.adapter = self._adapter()

    def _adapter(self) -> Files | None:
        try:
            from deltastore.exports import lora
        except ImportError:
            return None
        out = self.root / "adapter"
        v = next(v for v in self.versions if v.encoding == "int8")
        lora.export_lora(self.store, v.id, out, rank=2, base_weights=self.base_file)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _dtype(t: torch.Tensor) -> str:
    from deltastore.core.hashing import dtype_name

    return dtype_name(t.dtype)


def object_file(payload: bytes, *, compression: int, body: bytes | None = None, declared: int | None = None) -> bytes:
    if body is None:
        body = payload if compression == RAW else zstandard.ZstdCompressor().compress(payload)
    return HEADER.pack(MAGIC, 1, compression, 0, len(payload) if declared is None else declared) + body


def extra_objects() -> list[bytes]:
    """One object as the store writes a large payload (four frames, read two at a time), and
    object files the store would not write but a reader must handle: several frames, a frame
    without its content size, a skippable frame, an empty raw payload, and a small bomb (a few
    kB of zstd that expand to 64 MiB)."""
    data = bytes(range(256)) * 64
    no_size = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    frame_no_size = no_size.compress(data) + no_size.flush()
    two = zstandard.ZstdCompressor().compress(data[:5000]) + zstandard.ZstdCompressor().compress(data[5000:])
    skippable = struct.pack("<II", 0x184D2A50, 3) + b"abc" + zstandard.ZstdCompressor().compress(data)
    zeros = zstandard.ZstdCompressor().compress(bytes(16 * MiB))
    framed = (data + bytes(300)) * 70  # over 1 MiB: written as frames that a reader splits
    return [
        object_file(framed, compression=ZSTD, body=bytes(compress(framed)[0])),
        object_file(data, compression=ZSTD, body=frame_no_size),
        object_file(data, compression=ZSTD, body=two),
        object_file(data, compression=ZSTD, body=skippable),
        object_file(b"", compression=RAW),
        object_file(b"x" * 40, compression=RAW),
        object_file(bytes(64 * MiB), compression=ZSTD, body=zeros * 4),
    ]


# -- targets -------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    reader: str  # what it feeds, in words
    seeds: list[Files]
    run: Callable[[Files], None]
    bound: Callable[[Files], int]


def _json_bound(files: Files) -> int:
    # Parsing JSON costs up to ~25 bytes of objects per byte of text; readers also hold the
    # text and a copy or two of what they decode.
    return 32 * sum(len(v) for v in files.values()) + 16 * MiB


def safetensors_target(world: World, work: Path) -> Target:
    folder = work / "safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    seeds = [{"model.safetensors": world.base_file.read_bytes()}]
    seeds += [{"model.safetensors": p["v.safetensors"]} for p in world.payloads]
    if world.adapter:
        seeds.append({"model.safetensors": world.adapter["adapter_model.safetensors"]})

    def run(files: Files) -> None:
        path.write_bytes(files["model.safetensors"])
        source = open_model(path)
        for name in source.names:
            tensor_id(source.get(name))

    return Target("safetensors", "safetensors header and tensors (models.read_header, open_model)",
                  seeds, run, _json_bound)


def shard_index_target(world: World, work: Path) -> Target:
    folder = work / "sharded"
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(world.base)
    weight_map = {}
    for k, part in enumerate((names[0::2], names[1::2])):
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        write_safetensors(folder / file, [TensorInfo(n, _dtype(world.base[n]), tuple(world.base[n].shape)) for n in part],
                          lambda n: world.base[n])
        weight_map.update({n: file for n in part})
    index = json.dumps({"metadata": {"total_size": 1234}, "weight_map": weight_map}, indent=2).encode()
    seeds = [{"model.safetensors.index.json": index}]

    def run(files: Files) -> None:
        (folder / "model.safetensors.index.json").write_bytes(files["model.safetensors.index.json"])
        source = open_model(folder)
        for name in source.names:
            tensor_id(source.get(name))

    return Target("shard_index", "sharded model index (models.weight_files)", seeds, run, _json_bound)


def object_target(world: World, work: Path) -> Target:
    objects = ObjectStore(work / "objects")
    seeds = [{"x.object": blob} for blob in world.objects + extra_objects()]

    def run(files: Files) -> None:
        blob = files["x.object"]
        probe = bytes_id(blob)  # any id: decode_file checks the header and the size only
        payload = ObjectStore.decode_file(probe, blob)
        object_id = bytes_id(payload)
        path = objects.path(object_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        try:
            assert objects.get(object_id) == payload
            assert objects.get(object_id, raw_size=len(payload)) == payload
            for wrong in (len(payload) + 1, max(0, len(payload) - 1)):
                if wrong != len(payload):
                    try:
                        objects.get(object_id, raw_size=wrong)
                        raise AssertionError(f"a payload of {len(payload)} bytes was read as {wrong}")
                    except CorruptObject:
                        pass
        finally:
            path.unlink()

    def bound(files: Files) -> int:
        blob = files["x.object"]
        declared = struct.unpack_from("<Q", blob, 8)[0] if len(blob) >= 16 else 0
        # What the header declares, never more than its body can hold, four times over (a
        # growing buffer and its copy), plus the first buffer and the file itself.
        possible = min(declared + 1, max(0, len(blob) - 16) * (1 << 15))
        return 4 * possible + 64 * len(blob) + 20 * MiB

    return Target("object", "object files (ObjectStore.get, decode_file)", seeds, run, bound)


def manifest_target(world: World, work: Path) -> Target:
    from deltastore.repo.records import check_manifest, parse_manifest

    seeds = [{"manifest.json": m} for m in world.manifests]
    store = world.store
    base = world.base

    def run(files: Files) -> None:
        m = parse_manifest(files["manifest.json"])
        v = check_manifest(m)
        # As materialize does: each entry decoded from verified objects against its base tensor.
        for e in v.tensors[:32]:
            if not all(store.objects.exists(o.id) for o in e.objects.values()):
                continue
            result = store.decode_entry(e, base.get(e.name))
            tensor_id(result)

    def bound(files: Files) -> int:
        stored = sum(len(o) for o in world.objects)
        return _json_bound(files) + 16 * (stored + sum(t.numel() * 8 for t in base.values()))

    return Target("manifest", "version manifests (records.parse_manifest, check_manifest, decode_entry)",
                  seeds, run, bound)


def hub_index_target(world: World, work: Path) -> Target:
    from deltastore.sharing import hubcard, hubindex

    def run(files: Files) -> None:
        index = hubindex.check_index(files["deltastore.json"], REPO, None)
        chosen = hubindex.choose(index, REPO, None, None)
        for hv in chosen[:3]:
            hubindex.choose(index, REPO, hv.tag, hv.stance)
        hubcard.model_card(REPO, index)

    return Target("hub_index", "Hub repo index deltastore.json (hubindex.check_index, choose, hubcard.model_card)",
                  [{"deltastore.json": world.index}], run, _json_bound)


def hub_payloads_target(world: World, work: Path) -> Target:
    from deltastore.sharing import hubchecks, hubindex
    from deltastore.repo.records import check_manifest, parse_manifest

    folder = work / "payloads"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "v.safetensors"

    def run(files: Files) -> None:
        # The manifest as the index names it (its own id), then the payload file against it.
        try:
            v = check_manifest(parse_manifest(files["v.json"]))
        except Exception:  # a manifest that no index could name: the pull stops before payloads
            return
        hv = hubindex.HubVersion(v.stance, v.number, v.id, hubindex.version_tag(v.stance, v.number),
                            f"{v.stance}/v{v.number}.safetensors", f"{v.stance}/v{v.number}.json")
        m, v = hubchecks.check_manifest_file(files["v.json"], hv, REPO, None)
        path.write_bytes(files["v.safetensors"])
        located = hubchecks.check_payloads(path, hv, m, v, REPO, None)
        for object_id, (p, start, size) in located.items():
            assert bytes_id(hubchecks.read_at(p, start, size)) == object_id

    return Target("hub_payloads", "pulled payload files v<N>.safetensors (hubchecks.check_payloads)",
                  world.payloads, run, _json_bound)


def peft_target(world: World, work: Path) -> Target | None:
    if world.adapter is None:
        return None
    from deltastore.exports import lora

    folder = work / "adapter"
    scratch = Store.init(work / "scratch-store")
    scratch.add_base(world.base_file, name="base")

    def run(files: Files) -> None:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        lora.import_lora(scratch, folder, "imported", base="base", base_weights=world.base_file)

    def bound(files: Files) -> int:
        return _json_bound(files) + 16 * sum(t.numel() * 8 for t in world.base.values())

    return Target("peft_adapter", "PEFT LoRA adapter folders (lora.import_lora)", [world.adapter], run, bound)


def metadata_file_target(world: World, work: Path) -> Target:
    from deltastore.engine.history import read_metadata_file

    folder = work / "metadata"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "meta.json"
    seed = json.dumps({"learning_rate": 1e-4, "epochs": 3, "examples": 128, "loss": 0.4213, "base": "qwen2-0.5b",
                       "lora": False, "notes": "curious, uncertain"}, indent=2).encode()

    def run(files: Files) -> None:
        path.write_bytes(files["meta.json"])
        read_metadata_file(path)

    return Target("metadata_file", "commit --meta-file (history.read_metadata_file)", [{"meta.json": seed}], run,
                  _json_bound)


BUILDERS = [safetensors_target, shard_index_target, object_target, manifest_target, hub_index_target,
            hub_payloads_target, peft_target, metadata_file_target]


def build(work: Path) -> dict[str, Target]:
    """Every target, seeded from one world built under `work`."""
    work = Path(work)
    world = World(work / "world")
    targets = {}
    for builder in BUILDERS:
        t = builder(world, work / "run")
        if t is not None:
            targets[t.name] = t
    return targets


__all__ = ["Target", "World", "build", "BUILDERS", "ENCODINGS"]
