"""Prepared stances: a version read, verified and decoded once, held in memory, and switched
into a live module by a copy (mode "full") or a decode on the fly (mode "packed").

Everything apply checks is checked by `prepare`, once: every object against its id, every
base tensor against the id the entry names, every lossy result against the id recorded at
commit. A switch then checks only what can have changed since: that the module's tensors are
still those it wrote (checked.py), or, for a tensor no switch has touched yet, that it is the
base (hashed once). Switches stay exactly revertible: the first one to touch a tensor keeps a
copy of its base bytes (on the module's device), and every later switch, and revert, writes
from that copy. Nothing is ever subtracted.

Memory, per stance: "full" holds the tensors apply produces for every entry (the bytes the
stance touches); "packed" holds its verified parts (int4: codes and scales, about its stored
size; lossless: its compressed objects). Once per module: the base bytes of every tensor a
switch has touched, until revert frees them.

Owns: PreparedStance, SwitchHandle, and decoding a prepared entry on the module's device.
Never reads the store after `prepare`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..codecs import encodings, ondevice
from ..core import checked, spare
from .apply import copy_bytes, each_until_failure, interrupts_deferred, match_names, module_tensors, reverted
from ..core.errors import BaseMismatch, CorruptObject, DeltastoreError, MissingObject
from ..core.hashing import DTYPES, bytes_id, dtype_name, tensor_id
from ..repo.objects import ObjectStore
from ..engine.reader import ChainError, Reader
from ..repo.records import TensorEntry, Version

MODES = ("full", "packed")


@dataclass(frozen=True)
class PreparedTensor:
    entry: TensorEntry
    result: torch.Tensor | None = None  # "full": the tensor apply produces, on the device
    parts: dict[str, Any] | None = None  # "packed": verified parts (uint8 tensors or bytes)
    compressed: bool = False  # "packed" lossless: `parts` are object files, decompressed at switch

    @property
    def nbytes(self) -> int:
        if self.result is not None:
            return self.result.numel() * self.result.element_size()
        return sum(_size(p) for p in (self.parts or {}).values())


@dataclass(frozen=True)
class PreparedStance:
    """A version ready to be switched into a module (the store's `switch(module, prepared)`)."""

    version: Version
    mode: str
    device: torch.device
    tensors: tuple[PreparedTensor, ...] = field(repr=False)

    @property
    def nbytes(self) -> int:
        """The memory this stance holds (host or device)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def names(self) -> list[str]:
        return [t.entry.name for t in self.tensors]


def _size(part: Any) -> int:
    return part.numel() if isinstance(part, torch.Tensor) else len(part)


# -- prepare ------------------------------------------------------------------------------------


def prepare(reader: Reader, version: Version, *, device: torch.device | str | None = None, mode: str = "full",
            base_weights: Any = None) -> PreparedStance:
    """Read, verify and decode `version` once, against its base's weights (those given, else
    where `base add` found them)."""
    if mode not in MODES:
        raise DeltastoreError(f"unknown prepare mode {mode!r}; use 'full' (decoded tensors) or 'packed' (stored codes)")
    if mode == "packed" and version.against is not None:
        raise ChainError(f"{version.ref} is stored against another version: its codes are deltas against that "
                         "version's result, not the base's; prepare it with mode='full'")
    # "cuda" names the current CUDA device, whose tensors say "cuda:0": compare like with like.
    device = torch.empty(0, device=device).device if device is not None else torch.device("cpu")
    base = reader.base(version.base_id)
    source = reader.base_source(base, base_weights)
    prepared = []
    for entry in version.tensors:
        if entry.base_tensor_id is None or entry.name not in source:
            raise BaseMismatch(base.id, None, [entry.name], "the base has no tensor of this name to switch from")
        base_tensor = source.get(entry.name)
        if entry.dtype != dtype_name(base_tensor.dtype) or tuple(entry.shape) != tuple(base_tensor.shape):
            raise DeltastoreError(f"{version.ref} changes the dtype or shape of {entry.name!r}, which a switch "
                                  "cannot copy in place; apply it with Store.apply instead")
        if tensor_id(base_tensor) != entry.base_tensor_id:
            raise BaseMismatch(base.id, None, [entry.name], "the base weights differ from those registered")
        prepared.append(_prepare_entry(reader, version, entry, base_tensor, device, mode))
        source.release(entry.name)
    return PreparedStance(version, mode, device, tuple(prepared))


def _prepare_entry(reader: Reader, version: Version, entry: TensorEntry, base_tensor: torch.Tensor,
                   device: torch.device, mode: str) -> PreparedTensor:
    exact = encodings.from_params(entry.encoding, entry.params).exact
    if mode == "packed" and exact:
        # The compressed object files, each checked once here: a switch decompresses them
        # (deterministic) without hashing again. They never leave this process's memory.
        return PreparedTensor(entry, parts={part: _verified_file(reader, o.id, o.size)
                                            for part, o in entry.objects.items()}, compressed=True)
    parts = reader.read_parts(entry)
    result = reader.decode_entry(entry, base_tensor, parts)
    if not exact:
        entry.check_result(result, version.ref, untouched="nothing was prepared")
    if mode == "full":
        return PreparedTensor(entry, result=_owned(result, device))
    if entry.encoding in ondevice.ENCODINGS and device.type != "cpu":
        return PreparedTensor(entry, parts={p: ondevice.uint8_on(b, device) for p, b in parts.items()})
    return PreparedTensor(entry, parts={p: bytes(b) for p, b in parts.items()})


def _verified_file(reader: Reader, object_id: str, size: int) -> bytes:
    try:
        blob = reader.repo.objects.path(object_id).read_bytes()
    except FileNotFoundError:
        raise MissingObject(object_id) from None
    payload = reader.repo.objects.decode_file(object_id, blob, raw_size=size)
    if bytes_id(payload) != object_id:
        raise CorruptObject(object_id, "content does not match its id")
    return blob


def _owned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`, contiguous (decoded results own their memory)."""
    return t.to(device).contiguous()


# -- decoding ----------------------------------------------------------------------------------


def decode(p: PreparedTensor, base: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor apply produces for a packed entry, from the kept base, on its device
    (ondevice.py where the encoding allows). On the CPU, written into `out` (a module tensor)
    where given: the same sliced decode as apply's, a slice of the result at a time in the
    cache. Returns the result (`out` or not)."""
    entry = p.entry
    dtype, shape = DTYPES[entry.dtype], tuple(entry.shape)
    parts = p.parts
    if p.compressed:
        parts = {part: ObjectStore.decode_file(entry.objects[part].id, blob, raw_size=entry.objects[part].size)
                 for part, blob in parts.items()}
    if ondevice.decodes(entry, base):
        return ondevice.decode(entry, parts, base)
    # The reference decode, on the CPU.
    parts = {k: (v.cpu().numpy().tobytes() if isinstance(v, torch.Tensor) else v) for k, v in parts.items()}
    on_cpu = base.device.type == "cpu"
    into = out if on_cpu and out is not None and out.is_contiguous() and out.dtype == dtype \
        and tuple(out.shape) == shape else None
    result = encodings.from_params(entry.encoding, entry.params).decode(
        base if on_cpu else base.cpu(), encodings.Encoded(parts, entry.params), dtype=dtype, shape=shape, out=into)
    return result.to(base.device)


# -- switching ----------------------------------------------------------------------------------


class SwitchHandle:
    """Prepared stances switched into one module, and the base bytes to put back.

    `version` is the stance the module holds now (None: the base)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.current: PreparedStance | None = None
        self.active = True
        self.on_revert: list[Callable[[], None]] = []  # called once reverted (apply.ApplyHandle's)
        # module name -> (module tensor, a copy of its base bytes, the base's tensor id)
        self._kept: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = {}

    @property
    def version(self) -> Version | None:
        return self.current.version if self.current is not None else None

    @property
    def names(self) -> list[str]:
        return self.current.names if self.current is not None else []

    def switch(self, stance: PreparedStance | None) -> None:
        """Make the module hold `stance` (None: the base). Everything is checked before the
        first write; on an error while writing, the module is put back to what it held."""
        if not self.active:
            raise DeltastoreError("this switch handle was reverted; switch through the store again")
        live = self._live(stance)
        self._check(stance, live)
        with torch.no_grad(), interrupts_deferred():
            for name, t, p in live:
                if name not in self._kept:
                    self._kept[name] = (t, _keep(t), p.entry.base_tensor_id)
            previous = self.current
            try:
                self._write(stance, live)
                self.current = stance
            except BaseException:
                self._write(previous, self._live(previous))
                raise
            finally:
                self._remember()

    def revert(self) -> None:
        """Put the exact base bytes back, and free them. Idempotent."""
        if not self.active:
            return
        with torch.no_grad(), interrupts_deferred():
            self._write(None, [])
            self.current = None
            self._remember()
        for _, kept, _ in self._kept.values():
            spare.give(kept)
        self._kept = {}
        self.active = False
        reverted(self.on_revert)

    # -- inside --------------------------------------------------------------------------------

    def _live(self, stance: PreparedStance | None) -> list[tuple[str, torch.Tensor, PreparedTensor]]:
        """(module name, module tensor, prepared tensor) for each entry of `stance`."""
        if stance is None:
            return []
        current = module_tensors(self.module, stance.names)
        mapping = match_names(stance.names, set(current))
        return [(mapping[p.entry.name], current[mapping[p.entry.name]], p) for p in stance.tensors]

    def _check(self, stance: PreparedStance | None, live: list[tuple[str, torch.Tensor, PreparedTensor]]) -> None:
        """Every tensor this handle wrote still holds what it wrote; every other tensor the
        stance touches is its base. Only the latter is ever hashed, and once."""
        changed = [name for name, (t, _, _) in self._kept.items() if checked.known_id(t) is None]
        if changed:
            raise DeltastoreError(
                f"{len(changed)} tensor(s) of the module changed since the last switch ({', '.join(changed[:3])}); "
                "nothing was written: revert it (Store.revert) to put the base back, or prepare again")
        if stance is None:
            return
        if stance.device.type != "cpu" or any(t.device.type != "cpu" for _, t, _ in live):
            devices = {t.device for _, t, _ in live}
            if devices != {stance.device}:
                raise DeltastoreError(f"{stance.version.ref} was prepared on {stance.device}, the module is on "
                                      f"{', '.join(sorted(map(str, devices)))}; prepare it with device= the module's")
        wrong = []
        for name, t, p in live:
            if name in self._kept:
                continue
            if tuple(t.shape) != tuple(p.entry.shape) or dtype_name(t.dtype) != p.entry.dtype:
                wrong.append(name)
            elif checked.known_id(t) != p.entry.base_tensor_id:
                if tensor_id(t) != p.entry.base_tensor_id:
                    wrong.append(name)
                else:
                    checked.remember(t, p.entry.base_tensor_id)
        if wrong:
            raise BaseMismatch(stance.version.base_id, None, wrong,
                               "these tensors are not the base's (is another stance applied? revert it first)")

    def _write(self, stance: PreparedStance | None, live: list[tuple[str, torch.Tensor, PreparedTensor]]) -> None:
        """Write `stance` into the module, and the base into every kept tensor it leaves out."""
        held = {name: p for name, _, p in live}
        # Two tensors at a time (apply.each_until_failure) are the parallelism: torch's own intra-op
        # threads would only contend with them (as in pools.in_order).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _, error = each_until_failure(_write_one, [(t, held.get(name), base) for name, (t, base, _) in self._kept.items()])
        finally:
            torch.set_num_threads(threads)
        if error is not None:
            raise error

    def _remember(self) -> None:
        """What each kept tensor holds now (checked.py): the next switch checks only that."""
        held = {name: p.entry.result_tensor_id for name, _, p in self._live(self.current)}
        for name, (t, _, base_id) in self._kept.items():
            checked.remember(t, held.get(name, base_id))


def _keep(t: torch.Tensor) -> torch.Tensor:
    """A copy of a module tensor's base bytes, on its device."""
    kept = spare.take(tuple(t.shape), t.dtype) if t.device.type == "cpu" \
        else torch.empty_like(t, memory_format=torch.contiguous_format)
    copy_bytes(kept, t.detach())
    return kept


def _write_one(t: torch.Tensor, p: PreparedTensor | None, base: torch.Tensor) -> None:
    if p is None:
        copy_bytes(t, base)
    elif p.result is not None:
        copy_bytes(t, p.result)
    else:
        result = decode(p, base, out=t.detach())
        if result.data_ptr() != t.data_ptr():
            copy_bytes(t, result)


__all__ = ["PreparedStance", "PreparedTensor", "SwitchHandle", "prepare", "decode", "MODES"]
