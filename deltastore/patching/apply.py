"""Apply a version to a live nn.Module, in place, and revert it bit for bit.

Everything that can fail is done before the first parameter is touched: every object is read
and verified, every base tensor's id is checked, every lossy result is decoded and checked
against the id recorded at commit. Only then are parameters overwritten; an error during that
last step puts back what was already written. A lossless result, a bitwise function of its
verified payload and base that needs no check, is decoded as it is written: each chunk's base
bytes are saved first (one pass over the module's bytes instead of two). Revert copies the
saved base bytes back: it never subtracts a delta, so it is exact whatever the encoding.

A base tensor this process has already checked, and that is unchanged since, is not hashed
again (checked.py); objects are decompressed, and results decoded, into buffers an earlier
apply or revert gave back (spare.py). For switching many times between the same stances, see
prepared.py. On a CUDA module, int4, int8 and lossless entries decode on the GPU (ondevice.py):
the hashes still read the base and a lossy result on the CPU, but the arithmetic does not.
"""

from __future__ import annotations

import functools
import math
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..codecs import encodings, ondevice, xorbytes
from ..core import checked, spare
from ..core.errors import BaseMismatch
from ..core.hashing import dtype_name, tensor_id
from ..core.pools import cores, in_order, pool, two_threads
from ..engine.reader import Reader
from ..repo.records import TensorEntry, Version

# Versions of at least this many elements are checked and decoded two tensors at a time.
PIPELINED_FROM = 1 << 23
# ... and written into the module, and back on revert, two tensors at a time from this many
# bytes: one core's memcpy does not use all of the memory's bandwidth (copying 988 MB of
# tensors took 50 ms on one thread, 31 ms on two), while a surgical delta's few MB would
# wait longer for a thread to wake than for its copy.
PARALLEL_WRITE_FROM = 64 << 20
# A smaller version shares its checks with one pool thread from this many bytes of objects:
# below that, waking the thread costs more than it saves.
SHARED_FROM = 1 << 18


@dataclass
class ApplyHandle:
    """What one apply changed in a module, and the base bytes to put back."""

    version: Version
    module: torch.nn.Module
    _patched: list[tuple[torch.Tensor, torch.Tensor, Any]] = field(default_factory=list, repr=False)
    _entries: list[TensorEntry] = field(default_factory=list, repr=False)  # in the order of _patched
    active: bool = True
    #: Called once the handle is reverted (the store that applied it lets go of it).
    on_revert: list[Callable[[], None]] = field(default_factory=list, repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.version.tensors]

    def revert(self) -> None:
        """Put the exact base bytes back. Idempotent."""
        if not self.active:
            return
        _restore(self._patched)
        _remember([t for t, _, _ in self._patched], [e.base_tensor_id for e in self._entries])
        for _, original, _ in self._patched:
            spare.give(original)  # ours: a decoded result or a clone, referenced nowhere else
        self._patched = []
        self.active = False
        reverted(self.on_revert)


def reverted(callbacks: list[Callable[[], None]]) -> None:
    """A handle's `on_revert` callbacks, each called once."""
    while callbacks:
        callbacks.pop(0)()


def match_names(entries: list[str], names: set[str]) -> dict[str, str]:
    """Entry name -> module name, allowing for a wrapper's prefix ("model.", "base_model.model.")
    on either side."""
    if all(e in names for e in entries):
        return {e: e for e in entries}
    if not entries:
        return {}
    first = entries[0]
    prefixes = {n[: -len(first)] for n in names if n.endswith("." + first)}
    for p in sorted(prefixes, key=len):
        if all(p + e in names for e in entries):
            return {e: p + e for e in entries}
    for n in names:
        if first.endswith("." + n):
            p = first[: -len(n)]
            if all(e.startswith(p) and e[len(p):] in names for e in entries):
                return {e: e[len(p):] for e in entries}
    missing = [e for e in entries if e not in names]
    raise BaseMismatch("(the version's base)", None, missing, "the module has no tensors of these names")


@dataclass
class _XorInPlace:
    """A lossless entry's verified payload, decoded at install straight into its module tensor
    (xorbytes.xor_ungroup_in_place): the result of an exact encoding is a bitwise function of
    the verified payload and base, so nothing is left to check once both are verified."""

    payload: memoryview
    buffers: list[torch.Tensor]
    itemsize: int

    def write(self, t: torch.Tensor) -> torch.Tensor:
        """Decode into `t`; returns a buffer holding the base bytes it replaced."""
        original = spare.take(tuple(t.shape), t.dtype)
        xorbytes.xor_ungroup_in_place(self.payload, self.itemsize, _bytes_view(t), _bytes_view(original))
        self.payload = memoryview(b"")
        for buffer in self.buffers:
            spare.give(buffer)
        self.buffers = []
        return original


def prepare(reader: Reader, version: Version, current: dict[str, torch.Tensor]
            ) -> list[tuple[TensorEntry, torch.Tensor, torch.Tensor | _XorInPlace]]:
    """(entry, module tensor, result) for every entry, everything verified. A result is on the
    CPU, or on the module's device where the entry decodes there (ondevice.py: a CUDA module's
    int4, int8 and lossless entries). A lossless entry's result may instead be its verified
    payload (_XorInPlace), decoded by `install`.

    A large version runs a tensor per core at a time (`in_order`, at most 8): hashing, reading
    and decoding release the GIL, and one thread per tensor keeps the cores busy, where
    torch's own intra-op threads wait on each other on a busy machine (a whole-model int4
    apply ran 2x slower). A small version (a surgical delta) is checked as a few whole tasks
    (the bases' hashes; each entry's objects read, decompressed in one piece and hashed) that
    this thread shares with one long-lived pool thread, starting the largest itself at once
    (pools.two_threads); its decoding is left to this thread. A pipeline of a pool thread per
    tensor would cost more in hand-offs than its few MB of work (a two-tensor apply, qwen0.5b
    shape, load 3: 3.4 ms on one thread, 4.0 ms with a read thread); sharing costs one
    hand-off (SmolLM2's two-tensor apply, 300 interleaved rounds: 3.03 -> 2.40 ms with both
    cores free, 3.03 -> 3.13 ms with one core busy elsewhere)."""
    work = _Preparing(reader, version, current)
    entries, live = work.entries, work.live
    if sum(math.prod(e.shape) for e in version.tensors) < PIPELINED_FROM:
        # The bases' hashes and the objects' reading, decompressing and hashing all release the
        # GIL: this thread and one pool thread share them out (the bases as one task, each
        # entry's objects as one, the largest started at once). Nothing is decoded before every
        # check has passed, and a wrong base is named before a damaged object.
        sizes = {name: sum(o.size for o in entries[name].objects.values()) for name in entries}
        by_size = sorted(entries, key=sizes.__getitem__)
        run = two_threads if sum(sizes.values()) >= SHARED_FROM else _in_turn
        _, *reads = run([lambda: work.check_bases({name: work.checked_base(name) for name in entries})]
                        + [lambda name=name: read_parts(reader, entries[name], parallel=False)
                           for name in by_size])
        read = dict(zip(by_size, reads))
        return [(entries[name], live[name], work.decoded(name, read[name])) for name in entries]
    # Every result is kept until the end anyway, so workers may run ahead of a large tensor,
    # and there may be one per core: with the model on a GPU of a 16-core machine, eight
    # workers against two took a cold lossless apply of qwen0.5b from 1149 to 879 ms (int4:
    # 1055 to 989 ms; the embedding, a quarter of the bytes, is one worker's alone).
    workers = cores()
    work.check_bases(dict(in_order(list(entries), work.checked_base, ahead=len(entries), workers=workers)))
    return [(entries[name], live[name], result)
            for name, result in in_order(list(entries), work.decoded, ahead=len(entries), workers=workers)]


class _Preparing:
    """One apply's entries and the module tensors they write: each base checked, each entry
    decoded and its result checked (`prepare` runs these steps on its threads)."""

    def __init__(self, reader: Reader, version: Version, current: dict[str, torch.Tensor]):
        mapping = match_names([e.name for e in version.tensors], set(current))
        self.reader, self.version = reader, version
        self.entries = {e.name: e for e in version.tensors}
        self.live = {e.name: current[mapping[e.name]] for e in version.tensors}
        # A tensor that two entries write (tied names) takes its results one after the other: only
        # one written once may be decoded in place, against the base it still holds.
        storages = [t.untyped_storage().data_ptr() for t in self.live.values()]
        self.shared = {p for p in storages if storages.count(p) > 1}
        self.bases: dict[str, torch.Tensor] = {}

    def checked_base(self, name: str) -> torch.Tensor | None:
        """The base to decode against, checked: the module's own tensor where the entry
        decodes on its device (ondevice.py), else a copy on the CPU. None: not the base."""
        entry, t = self.entries[name], self.live[name]
        if entry.base_tensor_id is None:
            return None
        base = t.detach() if ondevice.decodes(entry, t) else t.detach().to("cpu")
        # Hashed (or written with known bytes) earlier in this process and unchanged since:
        # the base needs no second hashing (a tenth of a whole-model apply's time).
        if checked.known_id(t) == entry.base_tensor_id:
            return base
        if tensor_id(base) != entry.base_tensor_id:
            return None
        checked.remember(t, entry.base_tensor_id)
        return base

    def check_bases(self, bases: dict[str, torch.Tensor | None]) -> None:
        """Refuse the apply where a tensor is not the base's; else keep the bases to decode against."""
        wrong = [name for name, cpu in bases.items() if cpu is None]
        if wrong:
            raise BaseMismatch(self.version.base_id, None, wrong,
                               "these tensors are not the base's (is another stance applied? revert it first)")
        self.bases = bases

    def decoded(self, name: str, read: tuple[dict[str, memoryview], list[torch.Tensor]] | None = None
                ) -> torch.Tensor | _XorInPlace:
        entry, base = self.entries[name], self.bases[name]
        parts, buffers = read_parts(self.reader, entry) if read is None else read
        t = self.live[name]
        # (A chained entry's delta is against another version's result, not the module's base.)
        if entry.encoding == "lossless" and entry.params.get("mode") == "xor" and "xor" in parts \
                and entry.against_version is None \
                and entry.dtype == dtype_name(t.dtype) and tuple(entry.shape) == tuple(t.shape) \
                and len(parts["xor"]) == t.numel() * t.element_size() and _bytes_view(t) is not None \
                and t.untyped_storage().data_ptr() not in self.shared:
            return _XorInPlace(parts["xor"], buffers, t.element_size())
        if base.device.type != "cpu":
            # On the module's device (a GPU): the payloads cross, the arithmetic leaves the CPU.
            result = ondevice.decode(entry, parts, base)
        else:
            # Into a buffer an earlier revert gave back, where there is one (spare.py).
            out = spare.take(base.shape, base.dtype) if entry.dtype == dtype_name(base.dtype) \
                and tuple(entry.shape) == tuple(base.shape) else None
            result = self.reader.decode_entry(entry, base, parts, out=out)
        del parts
        for buffer in buffers:
            if result.device.type != "cpu" or not _overlap(buffer, result):
                spare.give(buffer)
        # An exact encoding's result is a bitwise function of the verified object and base:
        # hashing it again would only cost time (a third of a surgical apply's).
        if not encodings.from_params(entry.encoding, entry.params).exact:
            entry.check_result(result, self.version.ref, untouched="nothing was changed")
        return result


def _in_turn(tasks: list) -> list:
    return [task() for task in tasks]


def read_parts(reader: Reader, entry: TensorEntry, *, parallel: bool = True
               ) -> tuple[dict[str, memoryview], list[torch.Tensor]]:
    """An entry's payloads, each verified against its id, and the buffers that hold them:
    spare ones where there are (spare.py), given back once decoded. Into fresh memory, reading
    a whole-model lossless version's objects took 17% more CPU (967 against 825 ms)."""
    parts, buffers = {}, []
    for part, o in entry.objects.items():
        buffer = spare.take((o.size,), torch.uint8)
        parts[part] = reader.repo.objects.get(o.id, raw_size=o.size, parallel=parallel, into=buffer.numpy())
        buffers.append(buffer)
    return parts, buffers


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two CPU tensors' bytes share any memory (a result that is a view of its payload
    keeps the payload's buffer)."""
    a_start, b_start = a.data_ptr(), b.data_ptr()
    return a_start < b_start + b.numel() * b.element_size() and b_start < a_start + a.numel() * a.element_size()


def module_tensors(module: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The module's tensors that `names` need. Looked up by path first (a surgical delta then
    costs nothing per untouched layer); the whole state dict only for prefixed names."""
    found = {}
    for name in names:
        owner, _, leaf = name.rpartition(".")
        try:
            sub = module.get_submodule(owner) if owner else module
        except AttributeError:
            return module.state_dict(keep_vars=True)
        t = sub._parameters.get(leaf)
        if t is None:
            t = sub._buffers.get(leaf)
        if t is None:
            return module.state_dict(keep_vars=True)
        found[name] = t
    return found


def apply_module(reader: Reader, module: torch.nn.Module, version: Version, *, strict: bool = True) -> ApplyHandle:
    current = module_tensors(module, [e.name for e in version.tensors])
    plan = prepare(reader, version, current)
    return install(ApplyHandle(version, module), plan, [e.result_tensor_id for e, _, _ in plan])


def install(handle: ApplyHandle, plan: list[tuple[TensorEntry, torch.Tensor, torch.Tensor | _XorInPlace]],
            result_ids: list[str | None]) -> ApplyHandle:
    """Write each verified result into its module tensor, keeping the base bytes in `handle`
    for revert; on any error, put back what was written. `result_ids`: the id each result is
    known to have (None where it is not known: a mix of versions)."""
    with torch.no_grad(), interrupts_deferred():
        patched, error = each_until_failure(_overwrite, [(t, result) for _, t, result in plan])
        if error is not None:
            _restore(patched)
            _remember([t for _, t, _ in plan], [None] * len(plan))
            raise error
        handle._patched, handle._entries = patched, [e for e, _, _ in plan]
        _remember([t for t, _, _ in patched], result_ids)
    return handle


def _remember(tensors: list[torch.Tensor], ids: list[str | None]) -> None:
    """What each tensor holds after deltastore wrote it (see checked.py). A tensor whose
    storage was swapped (a changed shape or dtype) is forgotten: its id is not the entry's
    in every case."""
    for t, tid in zip(tensors, ids):
        checked.remember(t, tid)


def _overwrite(t: torch.Tensor, result: torch.Tensor | _XorInPlace) -> tuple[torch.Tensor, torch.Tensor, Any]:
    populate(t)
    if isinstance(result, _XorInPlace):
        return t, result.write(t), None
    if t.dtype == result.dtype and t.shape == result.shape and _exchange(t, result):
        return t, result, None  # `result` holds the base's bytes now
    original = _clone(t)
    if t.dtype == result.dtype and t.shape == result.shape:
        copy_bytes(t, result)
        return t, original, None
    # A changed dtype or shape cannot be copied in place: swap the storage, remember the old.
    old_data = t.data
    t.data = result.to(t.device)
    return t, original, old_data


def _restore(patched: list[tuple[torch.Tensor, torch.Tensor, Any]]) -> None:
    def put_back(t: torch.Tensor, original: torch.Tensor, old_data: Any) -> None:
        if old_data is not None:
            t.data = old_data
        copy_bytes(t, original)

    with torch.no_grad(), interrupts_deferred():
        _, error = each_until_failure(put_back, patched, backwards=True)
        if error is not None:
            raise error


def each_until_failure(work: Any, items: list[tuple], *, backwards: bool = False) -> tuple[list, BaseException | None]:
    """work(*item) for each item until one fails: (the results of those that succeeded, the
    error or None), so that a caller can put back exactly what was done. Each item's first
    element is the module tensor it writes. Two at a time where those are large in all, on
    the CPU and distinct; otherwise in order (`backwards`: in reverse, as a tensor written
    twice must be put back)."""
    tensors = [item[0] for item in items]
    parallel = sum(t.numel() * t.element_size() for t in tensors) >= PARALLEL_WRITE_FROM \
        and all(t.device.type == "cpu" for t in tensors) and len({t.data_ptr() for t in tensors}) == len(tensors)
    done: list = []
    if not parallel:
        for item in reversed(items) if backwards else items:
            try:
                done.append(work(*item))
            except BaseException as e:
                return done, e
        return done, None
    error = None
    for future in [pool("write").submit(work, *item) for item in items]:
        if error is not None and future.cancel():
            continue
        try:
            done.append(future.result())
        except BaseException as e:
            error = error or e
    return done, error


def _bytes_view(t: torch.Tensor):
    """A numpy view of a contiguous CPU tensor's bytes, or None."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return None
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def _exchange(t: torch.Tensor, result: torch.Tensor, *, step: int = 1 << 18) -> bool:
    """Swap the bytes of a module tensor and of a decoded result (ours, not shared) in place,
    a cache-sized slice at a time: the module gets the result, and the result's buffer keeps
    the base for revert. A copy of the base would be a fresh whole-model allocation, whose
    page faults cost more than the copying. False (nothing done) where it does not apply."""
    d, r = _bytes_view(t), _bytes_view(result)
    if d is None or r is None or d.size != r.size or not r.flags.writeable \
            or t.untyped_storage().data_ptr() == result.untyped_storage().data_ptr():
        return False
    spare = np.empty(min(step, d.size), dtype=np.uint8)
    for start in range(0, d.size, step):
        end = min(start + step, d.size)
        held = spare[:end - start]
        np.copyto(held, d[start:end])
        np.copyto(d[start:end], r[start:end])
        np.copyto(r[start:end], held)
    return True


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C waits until the block ends: a module is never left with one tensor half
    written, or written but not yet recorded for revert. (Only the main thread gets signals.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _clone(t: torch.Tensor) -> torch.Tensor:
    view = _bytes_view(t)
    if view is None:
        return t.detach().clone()
    return torch.from_numpy(view.copy()).view(t.dtype).reshape(t.shape)


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Bytes from src into dst. On CPU through numpy: a plain memcpy, where torch's copy_
    would hand a few MB to its thread pool and, on a busy machine, wait far longer for it."""
    d, s = _bytes_view(dst), _bytes_view(src)
    if d is not None and s is not None and d.size == s.size and dst.dtype == src.dtype:
        np.copyto(d, s)
    else:
        dst.detach().copy_(src)


__all__ = ["ApplyHandle", "apply_module", "install", "match_names", "prepare"]


_MADV_POPULATE_WRITE = 23  # Linux 5.14+


def populate(t: torch.Tensor) -> None:
    """Fault in, writable, the whole pages of a CPU tensor's memory at once, before every byte
    of it is written: a module loaded from a mapped checkpoint (transformers maps safetensors)
    is copy-on-write, and taking those faults one page at a time inside the writes made a cold
    apply onto a 0.5B model 15-20% slower. Nothing is read or changed; where the call is not
    supported (another kernel, another system), the writes fault as before."""
    if t.device.type != "cpu" or not t.is_contiguous() or not t.numel():
        return
    import ctypes
    import mmap

    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    madvise = _libc().madvise if _libc() is not None else None
    if last > first and madvise is not None:
        madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_POPULATE_WRITE)


@functools.cache
def _libc():
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
