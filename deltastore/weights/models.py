"""Reading and writing model weights: safetensors files, sharded Hugging Face folders, state
dicts and live modules, all seen as one `TensorSource` (name -> tensor, loaded one at a time).

The safetensors header is parsed here rather than trusted to a loader, because everything
read from outside is untrusted: its size, offsets, dtypes and names are checked before a byte
of tensor data is allocated. Tensors are read one at a time, so a commit never holds two
whole models. No pickle is ever loaded: `.bin`/`.pt` checkpoints are refused.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

from ..core import hashing
from ..core.errors import ModelFormatError, PickleRefused, UnsafeInput
from ..core.hashing import DTYPE_SIZES, dtype_name
from ..core.limits import load_json, read_bounded, shown
from ..core.names import check_name

# torch is imported by the functions that make tensors: reading headers and a mapped file's
# bytes needs none, so an in-place apply or revert of a lossless version runs without it
# (its import is most of a small apply's time).
if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20
# A mapped tensor is read this many bytes at a time where it is read whole (hashed, compared),
# each block's pages let go once read: a process's memory then does not grow with the largest
# tensor (a 7B model's embedding is 1 GB in bf16) while the hash keeps several MB per thread.
MAPPED_BLOCK = 16 << 20
# A header entry is an object and two lists; a Hub payload file of the largest manifest holds
# a few hundred thousand tensors. A header of more is refused before it is parsed.
MAX_FILE_TENSORS = 1 << 19
# A shard index names each tensor once, in ~80 bytes: 16 MiB is some 200,000 tensors.
MAX_INDEX_BYTES = 16 << 20
MAX_DIMS = 64
MAX_DIM = 1 << 40  # elements along one dimension; no real tensor comes near
_ITEMSIZE = DTYPE_SIZES
# Files that make up a model folder's weights; everything else (config, tokenizer) is copied.
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|pkl)$|^model\.safetensors\.index\.json$|.*\.bin\.index\.json$")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    file: Path | None = None
    start: int = 0  # absolute byte offsets in the file
    end: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(tensors, metadata, data offset) of a safetensors file, every field checked."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFormatError(f"{path} is not a safetensors file: shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise ModelFormatError(f"{path} is truncated or not a safetensors file (header of {n} bytes in a file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise ModelFormatError(f"cannot read {path}: {e.strerror}") from None
    header = load_json(raw, "its header", max_bytes=MAX_HEADER_BYTES, max_containers=3 * MAX_FILE_TENSORS + 64,
                       error=lambda why: ModelFormatError(f"{path} is not a safetensors file: {why}"))
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path} is not a safetensors file: its header is not an object")
    base = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelFormatError(f"{path}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
        check_name(name)
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
            raise ModelFormatError(f"{path}: tensor {name!r} has unsupported dtype {shown(dtype)}")
        # Each dimension bounded too: an empty tensor (one dimension 0) has no size to bound the rest.
        if not isinstance(info["shape"], list) or len(shape) > MAX_DIMS \
                or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape) \
                or not _is_int(start) or not _is_int(end):
            raise ModelFormatError(f"{path}: tensor {name!r} has a malformed shape or offsets")
        t = TensorInfo(name, dtype, shape, path, base + start, base + end)
        if start < 0 or end < start or t.end > size or end - start != t.nbytes:
            raise ModelFormatError(
                f"{path} is truncated or corrupt: tensor {name!r} needs {t.nbytes} bytes at "
                f"{start}..{end} of a {size - base}-byte data section")
        tensors[name] = t
    _check_layout(path, tensors, base, size)
    return tensors, metadata, base


def _check_layout(path: Path, tensors: dict[str, TensorInfo], base: int, size: int) -> None:
    """As safetensors checks a header: in order of their offsets, the tensors tile the data
    section from its first byte to the file's last, with no gap and no overlap. Two tensors on
    one byte range would make a write to one change the other."""
    at, previous = 0, None
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        begin, end = t.start - base, t.end - base
        if begin < at:
            raise ModelFormatError(f"{path} is corrupt: tensor {t.name!r} (bytes {begin}..{end} of its data) overlaps "
                                   f"tensor {previous!r}; safetensors refuses such a file")
        if begin > at:
            raise ModelFormatError(f"{path} is corrupt: bytes {at}..{begin} of its data belong to no tensor "
                                   f"(a gap before {t.name!r}); safetensors refuses such a file")
        at, previous = end, t.name
    if at != size - base:
        raise ModelFormatError(f"{path} is corrupt: its tensors end at byte {at} of a {size - base}-byte data section; "
                               "safetensors refuses such a file")


class MappedFile:
    """A weight file read through a private memory map: a tensor is a view of the page cache,
    with no copy of it and no fresh pages to fault in (copying both models out of the page
    cache cost a lossless commit of a 1 GB model a fifth of its time). The pages of a tensor
    are let go once it has been used (`release`), so the process holds no more of the file at
    a time than a copying reader would.

    A file written while it is mapped shows the new bytes: `check_unchanged` compares its
    size, times and inode with those seen when it was mapped, so that a caller refuses a model
    that changed under it rather than store a mix. (A file truncated meanwhile ends the
    process with SIGBUS on the next read past its new end, as with any memory-mapped reader;
    a store is crash-safe, so nothing half-written lands.)"""

    def __init__(self, path: Path, stamp: tuple[int, ...], opened_ns: int = 0):
        """`stamp`: the file's, from before its header was read; `opened_ns`: the clock
        (time.time_ns) just before that stamp was taken (what a trust record is dated by)."""
        self.path, self.stamp, self.opened_ns = path, stamp, opened_ns
        try:
            with open(path, "rb") as f:
                if _stamp(os.fstat(f.fileno())) != stamp:
                    raise ModelFormatError(f"{path} changed while it was being opened; try again once it is written")
                # ACCESS_COPY: writable views (torch warns about read-only ones), whose writes,
                # were anyone to make them, would never reach the file.
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise ModelFormatError(f"cannot read {path}: {e.strerror}") from None

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        import torch

        dtype = hashing.DTYPES[info.dtype]
        if info.end > len(self.map):
            raise ModelFormatError(f"{info.file} is truncated at tensor {info.name!r}")
        if not info.nbytes or info.start % _ITEMSIZE[info.dtype]:
            return read_tensor(info)  # nothing to map, or misaligned for its dtype: copy it
        return torch.frombuffer(self.map, dtype=dtype, count=info.nbytes // _ITEMSIZE[info.dtype],
                                offset=info.start).reshape(info.shape)

    def view(self, info: TensorInfo) -> memoryview:
        """A tensor's raw bytes, a view of the page cache (no torch, no copy)."""
        if info.end > len(self.map):
            raise ModelFormatError(f"{info.file} is truncated at tensor {info.name!r}")
        return memoryview(self.map)[info.start:info.end]

    def release(self, info: TensorInfo, first: int = 0, end: int | None = None) -> None:
        """Let the pages of a tensor's bytes `first`..`end` go (all of them by default)."""
        # Dropping the pages of a private, unwritten file mapping loses nothing: a later read
        # faults them in again from the page cache.
        stop = info.end if end is None else min(info.start + end, info.end)
        start = info.start + first
        start -= start % mmap.PAGESIZE
        if stop > start and hasattr(self.map, "madvise"):
            self.map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def changed(self) -> bool:
        try:
            return _stamp(self.path.stat()) != self.stamp
        except OSError:
            return True


def _stamp(stat: os.stat_result) -> tuple[int, ...]:
    """A file's identity and what changes with every write: (device, inode, size, mtime, ctime)."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def read_tensor(info: TensorInfo) -> torch.Tensor:
    import torch

    assert info.file is not None
    buf = bytearray(info.nbytes)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        if f.readinto(buf) != len(buf):
            raise ModelFormatError(f"{info.file} is truncated at tensor {info.name!r}")
    dtype = hashing.DTYPES[info.dtype]
    if not buf:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


class TensorSource:
    """Named tensors from anywhere, described without loading and loaded one at a time."""

    def __init__(self, infos: dict[str, TensorInfo], loader: Callable[[str], torch.Tensor], *,
                 path: Path | None = None, tensors: Mapping[str, torch.Tensor] | None = None,
                 mapped: Mapping[Path, MappedFile] | None = None):
        self.infos = dict(sorted(infos.items()))
        self._loader = loader
        self.path = path  # the file or folder, when it came from disk
        self.tensors = tensors  # the live tensors, when it came from memory
        self._mapped = mapped or {}

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    @property
    def mapped(self) -> Mapping[Path, MappedFile]:
        """The files read through memory maps (none for tensors from memory or copied reads)."""
        return self._mapped

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def get(self, name: str) -> torch.Tensor:
        return self._loader(name)

    def view(self, name: str) -> memoryview:
        """Tensor `name`'s raw bytes, from a mapped file: a view of the page cache."""
        info = self.infos[name]
        return self._mapped[info.file].view(info)

    def blocks(self, name: str) -> Iterable[memoryview]:
        """Tensor `name`'s raw bytes from its mapped file, MAPPED_BLOCK at a time, each block's
        pages let go once the next is asked for (or the loop ends)."""
        data = self.view(name)
        for at in range(0, len(data), MAPPED_BLOCK):
            try:
                yield data[at:at + MAPPED_BLOCK]
            finally:
                self.release(name, at, at + MAPPED_BLOCK)

    def tensor_id(self, name: str) -> str:
        """Tensor `name`'s id (hashing.tensor_id) from its mapped file, a block at a time."""
        info = self.infos[name]
        h = hashing.hasher(info.nbytes)
        h.update(hashing.id_header(info.dtype, info.shape))
        for block in self.blocks(name):
            h.update(block)
        return hashing.hexdigest_id(h)

    def release(self, name: str, first: int = 0, end: int | None = None) -> None:
        """Done with tensor `name` for now (or with its bytes `first`..`end`: a large tensor a
        block at a time): a mapped file lets its pages go (it stays readable)."""
        info = self.infos.get(name)
        mapped = self._mapped.get(info.file) if info is not None else None
        if mapped is not None:
            mapped.release(info, first, end)

    def check_unchanged(self) -> None:
        """Refuse a model whose mapped files were written since they were opened."""
        changed = [str(m.path) for m in self._mapped.values() if m.changed()]
        if changed:
            raise ModelFormatError(f"{', '.join(changed)} changed while it was being read; "
                                   "try again once it is written")

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    @property
    def folder(self) -> Path | None:
        if self.path is None:
            return None
        return self.path if self.path.is_dir() else self.path.parent


def weight_files(path: Path) -> list[Path]:
    """The safetensors files that hold a model file's or folder's weights."""
    path = Path(path)
    if path.is_file() or path.suffix in PICKLE_SUFFIXES + (".safetensors",):
        if path.suffix in PICKLE_SUFFIXES:
            raise PickleRefused(str(path))
        if not path.exists():
            raise ModelFormatError(f"{path} does not exist")
        return [path]
    if not path.is_dir():
        raise ModelFormatError(f"{path} does not exist; give a .safetensors file or a model folder")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            raw = read_bounded(index, MAX_INDEX_BYTES)
        except OSError as e:
            raise ModelFormatError(f"cannot read {index}: {e.strerror}") from None
        if raw is None:
            raise ModelFormatError(f"{index} is larger than {MAX_INDEX_BYTES} bytes; it is not a safetensors index")
        data = load_json(raw, str(index), max_bytes=MAX_INDEX_BYTES, error=ModelFormatError)
        try:
            weight_map = data["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelFormatError(f"{index} is not a safetensors index (no weight_map)") from None
        for name in names:
            if not isinstance(name, str):
                raise ModelFormatError(f"{index} names a shard that is not a string")
            check_name(name)
        return [path / name for name in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise ModelFormatError(f"{path} holds several .safetensors files but no {INDEX_FILE}; name the file")
    if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
        raise PickleRefused(str(path))
    raise ModelFormatError(f"{path} holds no .safetensors weights")


def open_files(path: Path, *, mapped: bool = False, files: list[Path] | None = None) -> TensorSource:
    """A model's safetensors files (`files`: these, rather than those `weight_files` finds).
    `mapped`: read through memory maps (see MappedFile), for a caller that only reads its
    tensors and calls `release` and `check_unchanged`."""
    infos: dict[str, TensorInfo] = {}
    maps: dict[Path, MappedFile] = {}
    for f in weight_files(path) if files is None else files:
        opened_ns = time.time_ns()
        stamp = _stamp(f.stat()) if mapped else None
        tensors, _, _ = read_header(f)
        for name, info in tensors.items():
            if name in infos:
                raise ModelFormatError(f"tensor {name!r} appears in both {infos[name].file} and {f}")
            infos[name] = info
        if mapped:
            maps[f] = MappedFile(f, stamp, opened_ns)
    if maps:
        return TensorSource(infos, lambda name: maps[infos[name].file].tensor(infos[name]), path=Path(path),
                            mapped=maps)
    return TensorSource(infos, lambda name: read_tensor(infos[name]), path=Path(path))


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's tensors by the names its safetensors file would use: tied (aliased) tensors
    once, under the name that safetensors' and transformers' own saving keep."""
    state = module.state_dict(keep_vars=True)
    tied = getattr(module, "all_tied_weights_keys", None) or getattr(module, "_tied_weights_keys", None) or []
    discard = list(tied.keys()) if isinstance(tied, dict) else list(tied)
    return without_aliases(state, discard=discard)


def without_aliases(state: Mapping[str, torch.Tensor], *, discard: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """`state` with each tensor that several names alias (tied weights) under one name only: the
    first in sorted order that is not in `discard`, else the first; the rule safetensors'
    `save_model` follows, so that a module, its state dict and its saved file have one base id.
    Tensors that overlap in memory without being the same tensor are refused: no one name
    could stand for them."""
    discard = set(discard)
    areas = []
    for name, t in state.items():
        if t.device.type != "meta" and t.numel():
            start = t.data_ptr()
            areas.append((t.device, start, start + _extent(t), name))
    areas.sort(key=lambda a: (str(a[0]), a[1], a[2], a[3]))
    groups: list[list[str]] = []
    last = None
    for device, start, stop, name in areas:
        if last is not None and last[0] == device and start < last[2]:
            if (start, stop) != last[1:] or not _same_view(state[name], state[groups[-1][0]]):
                raise ModelFormatError(f"tensors {groups[-1][0]!r} and {name!r} share memory without being one "
                                       "tensor; save the model with safetensors (save_model) first")
            groups[-1].append(name)
        else:
            groups.append([name])
            last = (device, start, stop)
    out = dict(state)
    for names in groups:
        if len(names) > 1:
            keep = min([n for n in names if n not in discard] or names)
            for name in names:
                if name != keep:
                    del out[name]
    return out


def _extent(t: torch.Tensor) -> int:
    # Bytes from the first element to just past the last one, whatever the strides.
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()


def open_tensors(tensors: Mapping[str, torch.Tensor]) -> TensorSource:
    infos = {}
    for name, t in tensors.items():
        check_name(name)
        infos[name] = TensorInfo(name, dtype_name(t.dtype), tuple(t.shape))
    return TensorSource(infos, lambda name: tensors[name].detach(), tensors=tensors)


def open_model(model: str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module, *,
               mapped: bool = False) -> TensorSource:
    """Any model a user can hand us, as a TensorSource (`mapped`: see open_files)."""
    if isinstance(model, TensorSource):
        return model
    if isinstance(model, (str, os.PathLike)):
        return open_files(Path(model), mapped=mapped)
    import torch

    if isinstance(model, torch.nn.Module):
        return open_tensors(module_state(model))
    if isinstance(model, Mapping):
        state = dict(model)
        # A state dict has lost its module's list of tied names. Hugging Face language models
        # tie `lm_head.weight` to the input embedding and save the latter: keep that one too, so
        # that a state dict has the base id of its module and of its saved folder.
        discard = [n for n in state if n == "lm_head.weight" or n.endswith(".lm_head.weight")]
        return open_tensors(without_aliases(state, discard=discard))
    return open_files(Path(model), mapped=mapped)


def other_files(folder: Path) -> list[Path]:
    """A model folder's files that are not weights: config, tokenizer, generation config."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not WEIGHT_FILE.match(p.name))


def safetensors_header(infos: Iterable[TensorInfo], metadata: dict[str, str] | None = None
                       ) -> tuple[bytes, dict[str, int]]:
    """The start of a safetensors file holding `infos` in name order (its 8-byte length, its
    header JSON), and where each tensor's bytes start in the file."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for info in sorted(infos, key=lambda i: i.name):
        header[info.name] = {"dtype": info.dtype, "shape": list(info.shape),
                             "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {name: start + h["data_offsets"][0] for name, h in header.items()
                                                if name != "__metadata__"}


def write_safetensors(path: Path, infos: Iterable[TensorInfo], tensor: Callable[[str], torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Stream a safetensors file tensor by tensor, so that writing never holds a whole model."""
    ordered = sorted(infos, key=lambda i: i.name)
    head, _ = safetensors_header(ordered, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for info in ordered:
            t = tensor(info.name)
            if dtype_name(t.dtype) != info.dtype or tuple(t.shape) != info.shape:
                raise ModelFormatError(f"tensor {info.name!r} is {t.dtype} {tuple(t.shape)}, expected {info.dtype} {info.shape}")
            if t.numel():
                f.write(hashing.tensor_bytes(t))
        f.flush()
        os.fsync(f.fileno())


def safe_relative(name: str) -> str:
    """A file name from outside, checked to stay inside its folder."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise UnsafeInput(f"file name {name[:80]!r} would leave its folder")
    return name
