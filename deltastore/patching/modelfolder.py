"""A whole model written to a new folder (`export`, `apply --out`, mixes): its weight files,
sharded as the base's, its index, the base's config and tokenizer files; written beside the
folder and renamed into place, so that it is either absent or whole.

Two ways to produce the tensors. `write_model` takes them one at a time from a callable
(torch tensors, each verified by its producer). `write_decoded` serves a version whose every
entry decodes in numpy against the base (lossless XOR, int8, int4; decoding.py), from the
base's mapped files: two tensors at a time, each base tensor's id checked, each result decoded
once, checked against its id and written at its offset in the new file (a tensor the version
leaves as the base's is copied in the kernel once checked); each file fsynced once."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

from ..core.durable import new_folder
from ..core.errors import ModelFormatError
from ..core.hashing import dtype_name
from ..core.pools import WORKERS
from ..engine.reader import Reader
from ..repo.records import Version
from ..weights.models import INDEX_FILE, TensorInfo, TensorSource, other_files, safetensors_header, write_safetensors
from .decoding import decoder, numpy_decodes
from .journalled import copy_range, pwrite_all, start_writeback

if TYPE_CHECKING:
    import torch

Progress = Callable[[int, int], None]
# Tensors the workers may decode and write past the one the progress waits for.
AHEAD = 32


def write_model(out: Path, source_infos: dict[str, TensorInfo], tensor: Callable[[str], torch.Tensor], *,
                files_from: Path | None, progress: Progress | None = None) -> Path:
    """A complete Hugging Face model folder at `out`: the tensors `source_infos` describes (their
    `file` gives the sharding), plus the config and tokenizer files of `files_from`."""
    with _model_folder(out) as tmp:
        groups = _by_file(source_infos)
        done, total = 0, len(source_infos)
        written: dict[str, TensorInfo] = {}

        def counted(name: str) -> torch.Tensor:
            nonlocal done
            t = tensor(name)
            written[name] = TensorInfo(name, dtype_name(t.dtype), tuple(t.shape))
            done += 1
            if progress:
                progress(done, total)
            return t

        for file, infos in groups.items():
            write_safetensors(tmp / file, infos, counted, metadata={"format": "pt"})
        _finish(tmp, source_infos, len(groups), sum(i.nbytes for i in written.values()), files_from)
    return Path(out)


def decodes_from_files(version: Version, source: TensorSource, expected: dict[str, dict]) -> bool:
    """Whether `write_decoded` can write this version from these base files: every base tensor
    there, every entry one of them and decoded in numpy against it."""
    return source.path is not None and all(name in source.infos for name in expected) and all(
        e.name in expected and numpy_decodes(e, source.infos[e.name]) for e in version.tensors)


def write_decoded(reader: Reader, version: Version, source: TensorSource, expected: dict[str, dict], out: Path,
                  *, base_changed: Callable[[list[str]], Exception], progress: Progress | None = None,
                  trusted: Mapping[str, str] | None = None) -> Path:
    """The model `version` describes, as `write_model` writes it, from the base's mapped files
    (`decodes_from_files`): every tensor's bytes verified (the base's against `expected`, a
    result against its id; `base_changed(names)`: the error for a base tensor that is not).
    `trusted`: the ids of base tensors in files this store trusts (trust.py), not hashed again;
    the files are checked unchanged at the end, as every mapped file is."""
    trusted = trusted or {}
    infos = {name: source.infos[name] for name in sorted(expected)}
    entries = {e.name: e for e in version.tensors}
    with _model_folder(out) as tmp:
        groups = _by_file(infos)
        outputs, where = {}, {}
        reads = {path: os.open(path, os.O_RDONLY) for path in dict.fromkeys(info.file for info in infos.values())}
        try:
            for file, group in groups.items():
                head, starts = safetensors_header(group, {"format": "pt"})
                outputs[file] = os.open(tmp / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                pwrite_all(outputs[file], memoryview(head), 0)
                where.update({name: (outputs[file], at) for name, at in starts.items()})
            decode, in_order = decoder(reader, version, source, [(e, infos[e.name]) for e in entries.values()],
                                       untouched=None, every_result=True)

            def write(name: str) -> None:
                info, (fd, at) = infos[name], where[name]
                wanted = expected[name]["tensor_id"]
                if trusted.get(name) != wanted and source.tensor_id(name) != wanted:
                    raise base_changed([name])
                if name in entries:
                    decode(entries[name], info, lambda offset, block: pwrite_all(fd, block, at + offset))
                else:
                    copy_range(reads[info.file], fd, info.nbytes, info.start, at)
                start_writeback(fd, at, info.nbytes)
                source.release(name)

            order = [name for group in groups.values() for name in sorted(i.name for i in group)]
            for done, _ in enumerate(in_order(order, write, WORKERS, AHEAD), 1):
                if progress:
                    progress(done, len(order))
            for fd in outputs.values():
                os.fsync(fd)
        finally:
            for fd in [*reads.values(), *outputs.values()]:
                os.close(fd)
        source.check_unchanged()
        _finish(tmp, infos, len(groups), sum(i.nbytes for i in infos.values()), source.folder)
    return Path(out)


@contextmanager
def _model_folder(out: Path) -> Iterator[Path]:
    """The hidden folder to fill, renamed to `out` (absent or empty) once filled."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelFormatError(f"{out} exists and is not empty; choose a new folder")
    with new_folder(out) as tmp:
        yield tmp


def _by_file(infos: dict[str, TensorInfo]) -> dict[str, list[TensorInfo]]:
    """The tensors of each weight file to write, named as the file they come from."""
    groups: dict[str, list[TensorInfo]] = {}
    for info in infos.values():
        groups.setdefault(info.file.name if info.file is not None else "model.safetensors", []).append(info)
    return groups


def _finish(tmp: Path, infos: dict[str, TensorInfo], files: int, size: int, files_from: Path | None) -> None:
    """The index of a sharded model, and the config and tokenizer files of `files_from`."""
    if files > 1:
        weight_map = {n: (i.file.name if i.file else "model.safetensors") for n, i in infos.items()}
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": size},
                                                  "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    if files_from is not None:
        for f in other_files(files_from):
            shutil.copy2(f, tmp / f.name)
