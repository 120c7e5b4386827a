"""A version's entries decoded for writing to files, from the base's mapped bytes: each
entry's objects read (verified against their ids) and its result decoded into a buffer its
worker keeps, a lossy result checked against the id recorded at commit. Lossless XOR, int8
and int4 entries against the base decode in numpy (absmax.py, bytegroups.py); torch is
imported only for the others."""

from __future__ import annotations

import math
import threading
from typing import Callable

import numpy as np

from ..codecs import absmax
from ..codecs.bytegroups import ungroup
from ..core.errors import ResultMismatch
from ..core.hashing import DTYPE_SIZES, hasher, hexdigest_id, id_header, tensor_bytes
from ..core.pools import pipelined
from ..engine.reader import Reader
from ..repo import objects
from ..repo.records import TensorEntry, Version
from ..weights.models import TensorInfo, TensorSource

# Elements decoded, hashed and written at a time: a large tensor (an embedding) then needs no
# buffer of its size for its result, and each block is hashed while it is still in the cache.
BLOCK = 1 << 21


def xor_against_base(entry: TensorEntry) -> bool:
    """A lossless entry whose result is the base's bytes XOR its one payload: decoded without
    torch. (An entry stored against another version's result needs that result first.)"""
    return (entry.encoding == "lossless" and entry.params.get("mode") == "xor" and set(entry.objects) == {"xor"}
            and entry.against_version is None)


def numpy_decodes(entry: TensorEntry, info: TensorInfo) -> bool:
    """Whether an entry decodes without torch: a lossless XOR, or int8 or int4 (absmax.py)
    of a bf16, fp16 or fp32 region, against the base."""
    if xor_against_base(entry):
        return True
    return (entry.encoding in absmax.BITS and entry.against_version is None and entry.dtype == info.dtype
            and info.dtype in absmax.DTYPES and tuple(entry.shape) == tuple(info.shape))


def _torch_decoder(reader: Reader, version: Version, source: TensorSource,
                   untouched: str | None) -> tuple[Callable, Callable]:
    """(entry, region, buffer) -> the entry's result bytes, decoded by its encoding in torch,
    a lossy result checked against its id; and pools' `in_order`, which keeps torch's own
    threads from contending with its workers. torch and the modules that load it are imported
    here, when a version has such entries: an apply of a lossless version runs without them."""
    import torch

    from ..codecs import encodings
    from ..core.pools import in_order
    from ..core.hashing import DTYPES

    def decode(entry: TensorEntry, info: TensorInfo, buffer: np.ndarray) -> memoryview:
        base = source.get(entry.name)
        out = torch.from_numpy(buffer).view(DTYPES[info.dtype]).reshape(info.shape) if info.nbytes else None
        result = reader.decode_entry(entry, base, out=out)
        # An exact encoding's result is a bitwise function of the verified object and base.
        if not encodings.from_params(entry.encoding, entry.params).exact:
            entry.check_result(result, version.ref, untouched=untouched)
        return tensor_bytes(result)

    return decode, lambda names, work, workers, ahead: in_order(names, work, workers=workers, ahead=ahead)


def decoder(reader: Reader, version: Version, source: TensorSource, regions: list, *,
            untouched: str | None = "nothing was changed", every_result: bool = False) -> tuple[Callable, Callable]:
    """decode(entry, region, write): the entry's objects read (verified; a large one a block at
    a time instead, its result then checked against its id), its result decoded
    and handed to `write(offset in the result, bytes)` a block at a time, a lossy result's id
    computed on the way and checked once its last block is written (`every_result`: an exact
    one's too; `untouched`: what the error says of the files): a caller that writes the blocks
    where they go puts them back if it raises. And the `in_order` to run it with. Lossless,
    int8 and int4 entries against the base are decoded in numpy from the mapped bytes; torch
    is imported only for the others (importing it cost 1.3 CPU-seconds), which are decoded
    whole and checked before their one write. Each worker decompresses and decodes into
    buffers it keeps: memory already written is faster to write into than fresh pages."""
    if all(numpy_decodes(entry, info) for entry, info in regions):
        decode_in_torch, in_order = None, pipelined
    else:
        decode_in_torch, in_order = _torch_decoder(reader, version, source, untouched)
    buffers = threading.local()

    def into(nbytes: int, kind: str = "result") -> np.ndarray:
        held = getattr(buffers, kind, None)
        if held is None or held.size < nbytes:
            held = np.empty(nbytes, dtype=np.uint8)
            setattr(buffers, kind, held)
        return held[:nbytes]

    def decode(entry: TensorEntry, info: TensorInfo, write: Callable[[int, memoryview], None]) -> None:
        if not numpy_decodes(entry, info):
            write(0, decode_in_torch(entry, info, into(info.nbytes)))
            return
        base = np.frombuffer(source.view(entry.name), dtype=np.uint8)
        xor = xor_against_base(entry)
        itemsize, numel = DTYPE_SIZES[info.dtype], info.nbytes // DTYPE_SIZES[info.dtype]
        sections = _sections(reader, entry, itemsize if xor else 1, numel)
        if sections is None:
            # Frame after frame on this worker (the other worker keeps the other core busy).
            parts = {part: reader.repo.objects.get(o.id, raw_size=o.size, parallel=False,
                                                   into=into(o.size, f"part {part}"))
                     for part, o in entry.objects.items()}
        h = None
        if every_result or not xor or sections is not None:
            # (A streamed part is never checked whole against its id: the result is, instead.)
            h = hasher(0)  # (one thread: the other worker has the other core)
            h.update(id_header(entry.dtype, entry.shape))
        step = BLOCK if xor else _absmax_block(entry.params)
        try:
            for first in range(0, numel, step):
                end = min(first + step, numel)
                block, below = into((end - first) * itemsize), base[first * itemsize:end * itemsize]
                if xor:
                    if sections is None:
                        ungroup(parts["xor"], itemsize, xor=below, out=block, elements=(first, end))
                    else:
                        planes = into((end - first) * itemsize, "planes")
                        for k, plane in enumerate(sections["xor"]):
                            plane.readinto(planes[k * (end - first):(k + 1) * (end - first)])
                        ungroup(planes, itemsize, xor=below, out=block)
                else:
                    bits = absmax.BITS[entry.encoding]
                    absmax.decode_into(_absmax_parts(parts if sections is None else sections, entry.params, bits,
                                                     numel, first, end, into, streamed=sections is not None),
                                       entry.params, bits=bits, base=below, base_dtype=info.dtype, out=block,
                                       dtype=entry.dtype)
                if h is not None:
                    h.update(block)
                write(first * itemsize, block.data)
                if sections is not None:
                    source.release(entry.name, first * itemsize, end * itemsize)
        finally:
            for readers in (sections or {}).values():
                for section in readers:
                    section.close()
        if h is not None and hexdigest_id(h) != entry.result_tensor_id:
            if sections is not None:
                for o in entry.objects.values():  # a corrupt object is named as one
                    reader.repo.objects.get(o.id, raw_size=o.size, parallel=False)
            raise ResultMismatch(entry.name, version.ref, untouched=untouched)

    return decode, in_order


def _sections(reader: Reader, entry: TensorEntry, planes: int, numel: int) -> dict[str, list] | None:
    """Each part's payload read a block at a time, where one is large (objects.STREAM_FROM) and
    of the size its encoding gives `numel` elements: a lossless payload as its `planes` byte
    planes read side by side, an int8 or int4 part in order. None: each part is read whole."""
    if all(o.size < objects.STREAM_FROM for o in entry.objects.values()):
        return None
    if xor_against_base(entry):
        sizes = {"xor": numel * planes}
    else:
        sizes = absmax.part_sizes(entry.params, bits=absmax.BITS[entry.encoding], numel=numel)
    if {part: o.size for part, o in entry.objects.items()} != sizes:
        return None  # the whole read names what is wrong
    sections = {}
    try:
        for part, o in entry.objects.items():
            found = reader.repo.objects.sections(o.id, o.size, planes)
            if found is None:
                return None
            sections[part] = found
    except BaseException:
        for found in sections.values():
            for section in found:
                section.close()
        raise
    return sections


def _absmax_parts(parts: dict, params: dict, bits: int, numel: int, first: int, end: int,
                  into: Callable[[int, str], np.ndarray], *, streamed: bool) -> dict:
    """An int8 or int4 block's parts: views of the whole parts, or read from their sections
    (`streamed`), which a block after block reads in order."""
    if not streamed:
        return absmax.block_parts(parts, params, bits=bits, numel=numel, first=first, end=end)
    starts, ends = absmax.block_bytes(params, bits=bits, first=first, end=end)
    block = {}
    for part, (section,) in parts.items():
        block[part] = into(ends[part] - starts[part], part)
        section.readinto(block[part])
    return block


def _absmax_block(params: dict) -> int:
    """BLOCK elements or about, a whole number of groups (and of int4 code bytes)."""
    unit = math.lcm(absmax.int_param(params, "group_size", 1), 2)
    return max(unit, BLOCK // unit * unit)
