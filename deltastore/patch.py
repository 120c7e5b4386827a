"""Apply a version to model files on disk, in place, journalled; revert it bit for bit; and
write a patched copy of a model to a new folder (`apply --out`, `export`).

In-place order (the journal makes every step undoable):
  1. check everything: base tensor ids, objects, decoded results; nothing written yet;
  2. store the original bytes of every region to be overwritten as objects (fsynced), then
     record the journal (target, regions, originals) in one catalog transaction;
  3. overwrite the regions, fsync; mark the journal applied.
A crash before 2 completes leaves the files untouched; after it, `revert` writes every
original region back, whether it was overwritten or not, and checks each against the base
tensor id. Revert never computes base bytes from a delta.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import BaseMismatch, DeltastoreError, JournalError, ModelFormatError
from .hashing import bytes_id, tensor_id
from .models import (INDEX_FILE, TensorInfo, open_files, other_files, read_tensor, weight_files,
                     write_safetensors)
from .records import Version


@dataclass(frozen=True)
class Journal:
    id: str
    target: str
    version_id: str
    state: str
    regions: int


def _target_key(target: Path) -> str:
    # Normalised, so that `../model` and `/abs/model` name one journal; symlinks are not
    # followed (a folder may be reached through one on purpose).
    return os.path.abspath(target)


def _header_ids(files: list[Path]) -> dict[str, str]:
    out = {}
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            out[f.name] = bytes_id(fh.read(n))
    return out


def apply_in_place(store: Any, version: Version, target: Path) -> Journal:
    target = Path(target)
    key = _target_key(target)
    if store.catalog.open_journals(key):
        raise JournalError(f"{target} already has a stance applied; run `deltastore revert {target}` first")
    files = weight_files(target)
    for f in files:
        if f.is_symlink():
            raise JournalError(f"{f} is a symlink (a Hugging Face cache file?): patching it would change "
                               "every model that shares it; use `apply --out DIR`")
    source = open_files(target)
    regions, wrong = [], []
    for entry in version.tensors:
        info = source.infos.get(entry.name)
        if info is None or entry.base_tensor_id is None:
            wrong.append(entry.name)
            continue
        if info.dtype != entry.dtype or info.shape != tuple(entry.shape):
            raise JournalError(f"{entry.name} changes dtype or shape ({info.dtype} {list(info.shape)} -> "
                               f"{entry.dtype} {list(entry.shape)}), which cannot be patched in place; "
                               "use `apply --out DIR`")
        base = read_tensor(info)
        if tensor_id(base) != entry.base_tensor_id:
            wrong.append(entry.name)
            continue
        regions.append((entry, info, base))
    if wrong:
        raise BaseMismatch(version.base_id, None, wrong,
                           f"{target} is not this version's base here (or another stance is applied)")
    results = []
    for entry, info, base in regions:
        result = store.decode_entry(entry, base)
        if tensor_id(result) != entry.result_tensor_id:
            raise DeltastoreError(f"tensor {entry.name!r} decodes to other bytes than at commit; nothing was changed")
        results.append(result)

    # 2. originals first, then the journal that points at them.
    token = uuid.uuid4().hex
    plan = {"files": _header_ids(files), "regions": []}
    originals = []
    try:
        for (entry, info, base) in regions:
            raw = base.reshape(-1).view(torch.uint8).numpy().data if base.numel() else b""
            oid = bytes_id(raw)
            store.catalog.add_pending(token, [oid])
            store.objects.put(raw, object_id=oid)
            originals.append(oid)
            plan["regions"].append({"file": info.file.name, "name": entry.name, "start": info.start,
                                    "end": info.end, "original": oid, "base": entry.base_tensor_id,
                                    "result": entry.result_tensor_id})
        journal = {"id": uuid.uuid4().hex, "target": key, "version_id": version.id, "state": "applying",
                   "plan": json.dumps(plan, sort_keys=True), "created": _now()}
        store.catalog.add_journal(journal, originals, token)
    finally:
        store.catalog.drop_pending(token)

    # 3. overwrite, file by file.
    by_file: dict[Path, list[tuple[TensorInfo, torch.Tensor]]] = {}
    for (entry, info, _), result in zip(regions, results):
        by_file.setdefault(info.file, []).append((info, result))
    for path, items in by_file.items():
        with open(path, "r+b") as f:
            for info, result in items:
                f.seek(info.start)
                f.write(result.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
    store.catalog.set_journal_state(journal["id"], "applied")
    return Journal(journal["id"], key, version.id, "applied", len(regions))


def revert_in_place(store: Any, target: Path) -> list[Journal]:
    key = _target_key(target)
    journals = store.catalog.open_journals(key)
    if not journals:
        raise JournalError(f"nothing was applied in place to {target} (no journal); nothing to revert")
    done = []
    for row in reversed(journals):
        plan = json.loads(row["plan"])
        folder = Path(key) if Path(key).is_dir() else Path(key).parent
        current = _header_ids([folder / name for name in plan["files"]])
        if current != plan["files"]:
            raise JournalError(f"the safetensors headers of {target} changed since apply; "
                               "the file was replaced, so its regions cannot be restored safely")
        by_file: dict[str, list[dict]] = {}
        for region in plan["regions"]:
            by_file.setdefault(region["file"], []).append(region)
        # Read and verify every original before writing any of them.
        originals = {r["original"]: store.objects.get(r["original"]) for r in plan["regions"]}
        for name, regions in by_file.items():
            with open(folder / name, "r+b") as f:
                for r in regions:
                    f.seek(r["start"])
                    f.write(originals[r["original"]])
                f.flush()
                os.fsync(f.fileno())
        check = open_files(Path(key))
        bad = [r["name"] for r in plan["regions"] if tensor_id(read_tensor(check.infos[r["name"]])) != r["base"]]
        if bad:
            raise JournalError(f"after revert, {', '.join(bad[:5])} still differ from the base; "
                               "the journal is kept: run `deltastore fsck`")
        store.catalog.drop_journal(row["id"])
        # The saved originals were this journal's alone; remove them now unless shared.
        from .maintenance import GcPlan, gc

        gc(store, GcPlan(tuple(sorted(originals)), 0))
        done.append(Journal(row["id"], key, row["version_id"], "reverted", len(plan["regions"])))
    return done


def write_model(out: Path, source_infos: dict[str, TensorInfo], tensor: Callable[[str], torch.Tensor], *,
                files_from: Path | None, progress: Callable[[int, int], None] | None = None) -> Path:
    """A complete Hugging Face model folder at `out`: the tensors `source_infos` describes (their
    `file` gives the sharding), plus the config and tokenizer files of `files_from`. Written next to `out` and renamed
    into place, so `out` is either absent or whole."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelFormatError(f"{out} exists and is not empty; choose a new folder")
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        groups: dict[str, list[TensorInfo]] = {}
        for info in source_infos.values():
            file = info.file.name if info.file is not None else "model.safetensors"
            groups.setdefault(file, []).append(info)
        done, total = 0, len(source_infos)
        written: dict[str, TensorInfo] = {}

        def counted(name: str) -> torch.Tensor:
            nonlocal done
            t = tensor(name)
            written[name] = TensorInfo(name, _dtype(t), tuple(t.shape))
            done += 1
            if progress:
                progress(done, total)
            return t

        for file, infos in groups.items():
            write_safetensors(tmp / file, infos, counted, metadata={"format": "pt"})
        if len(groups) > 1:
            weight_map = {n: (i.file.name if i.file else "model.safetensors") for n, i in source_infos.items()}
            size = sum(i.nbytes for i in written.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": size},
                                                      "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        if files_from is not None:
            for f in other_files(files_from):
                shutil.copy2(f, tmp / f.name)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _dtype(t: torch.Tensor) -> str:
    from .hashing import dtype_name

    return dtype_name(t.dtype)


def _now() -> str:
    from .catalog import now

    return now()
