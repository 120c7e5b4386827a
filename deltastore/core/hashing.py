"""Identity: tensor ids, base ids, object ids, version ids, canonical JSON.

Pure: touches no disk. Every id is tagged with its algorithm (`b3:` for BLAKE3), so that a
later change of algorithm is detectable rather than silently mismatching.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Iterable

import blake3

from .errors import ModelFormatError

ALGORITHM = "b3"

#: safetensors' names for dtypes: the one vocabulary for dtypes in manifests and the catalog,
#: with each one's size in bytes. Reading a store needs only these, not torch.
DTYPE_SIZES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

# Tensor bytes are hashed and stored little-endian; a big-endian host would need byte swaps
# everywhere, which nobody has asked for.
assert sys.byteorder == "little", "deltastore needs a little-endian host"


def _torch_dtypes() -> dict[str, Any]:
    # torch is imported where a tensor is at hand, never for reading a store: its import
    # costs about two CPU-seconds.
    table = globals().get("DTYPES")
    if table is not None:
        return table
    import torch

    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    globals()["DTYPES"] = table
    globals()["DTYPE_NAMES"] = {dtype: name for name, dtype in table.items()}
    return table


def __getattr__(name: str) -> Any:
    """``DTYPES`` (name -> torch.dtype) and ``DTYPE_NAMES`` (torch.dtype -> name), built on first use."""
    if name in ("DTYPES", "DTYPE_NAMES"):
        _torch_dtypes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: Any) -> str:
    names = globals().get("DTYPE_NAMES")
    if names is None:
        _torch_dtypes()
        names = globals()["DTYPE_NAMES"]
    try:
        return names[dtype]
    except KeyError:
        raise ModelFormatError(f"tensors of dtype {dtype} are not supported") from None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy where it is contiguous."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(_torch_dtypes()["U8"]).numpy()).cast("B")


def hasher(size: int) -> "blake3.blake3":
    """A BLAKE3 hasher for `size` bytes; `hexdigest_id` turns it into an id."""
    # Threads only pay off on large inputs; below ~1 MB they cost more than they save.
    return blake3.blake3(max_threads=blake3.blake3.AUTO if size >= 1 << 24 else 1)


def tensor_id(tensor: torch.Tensor) -> str:
    """`b3:` + BLAKE3 of `"{DTYPE} {d0,d1,...}\\n"` followed by the raw little-endian bytes."""
    if tensor.device.type == "cuda":
        h = hasher(tensor.numel() * tensor.element_size())
        h.update(id_header(dtype_name(tensor.dtype), tensor.shape))
        staged_update(h, tensor)
        return hexdigest_id(h)
    return raw_tensor_id(dtype_name(tensor.dtype), tensor.shape, tensor_bytes(tensor))


def id_header(dtype: str, shape: Iterable[int]) -> bytes:
    """What a tensor id hashes before the tensor's bytes: its dtype name and shape."""
    return f"{dtype} {','.join(str(d) for d in shape)}\n".encode()


def raw_tensor_id(dtype: str, shape: Iterable[int], data: bytes | memoryview) -> str:
    """`tensor_id` of a tensor given as its safetensors dtype name, shape and raw bytes (a
    region of a weight file, read without torch)."""
    h = hasher(len(data))
    h.update(id_header(dtype, shape))
    h.update(data)
    return hexdigest_id(h)


# A GPU tensor is hashed through two page-locked buffers of this size, one filling while the
# other is hashed: a copy into ordinary memory ran at 3 GB/s on an H200 machine, into locked
# memory at 43 GB/s (988 MB: 320 against 23 ms), and no whole copy of the tensor is made.
STAGE = 16 << 20


def staged_update(h: "blake3.blake3", tensor: torch.Tensor, *, step: int = STAGE) -> None:
    """Feed `h` a tensor's bytes a `step` at a time through staging buffers (page-locked for a
    CUDA tensor, whose copies then run while the previous slice is hashed)."""
    import torch  # a tensor is at hand: torch is loaded already

    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    n = flat.numel()
    if n == 0:
        return
    cuda = flat.device.type == "cuda"
    stages = [torch.empty(min(n, step), dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    done: list[Any] = [None, None]  # per stage: the event its copy records (CUDA), else None

    def start(k: int) -> None:
        begin = k * step
        stages[k % 2][:min(n, begin + step) - begin].copy_(flat[begin:begin + step], non_blocking=cuda)
        if cuda:
            done[k % 2] = torch.cuda.Event()
            done[k % 2].record(torch.cuda.current_stream(flat.device))

    slices = -(-n // step)
    start(0)
    for k in range(slices):
        if k + 1 < slices:
            start(k + 1)
        if cuda:
            done[k % 2].synchronize()
        h.update(stages[k % 2][:min(n, k * step + step) - k * step].numpy())


def bytes_id(data: bytes | memoryview) -> str:
    """The id of an object: BLAKE3 of its uncompressed payload."""
    h = hasher(len(data))
    h.update(data)
    return hexdigest_id(h)


def hexdigest_id(h: "blake3.blake3") -> str:
    return f"{ALGORITHM}:{h.hexdigest()}"


def canonical_json(value: Any) -> bytes:
    """The one byte form of a JSON value that ids are computed over (part of the format)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def base_id(tensor_ids: Iterable[tuple[str, str]]) -> str:
    """Hash of the sorted (name, tensor id) list, as canonical JSON."""
    return bytes_id(canonical_json(sorted([name, tid] for name, tid in tensor_ids)))


def manifest_id(manifest: dict) -> str:
    return bytes_id(canonical_json(manifest))


_ID = re.compile(ALGORITHM + ":[0-9a-f]{64}")


def is_id(text: str) -> bool:
    return isinstance(text, str) and _ID.fullmatch(text) is not None
