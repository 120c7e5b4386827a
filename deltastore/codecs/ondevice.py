"""Decoding an entry on the device of the module it is written into (a CUDA GPU).

The same arithmetic as encodings.py, in torch operations that run on any device: int8 and int4
(scale times code, plus the base, in float32, rounded once to the tensor's dtype) and the
lossless XOR (the byte planes interleaved, the base's bytes XORed in). Elementwise float32
operations round the same on every device, so the bytes are those the CPU decode gives, and a
lossy result is still checked against the id recorded at commit. On a GPU the payload crosses
to the device (int4: an eighth of a float32 tensor's size) instead of the base and the result
crossing twice, and the arithmetic leaves the CPU. Other encodings decode on the CPU.

Used by apply.py (a live apply onto a CUDA module) and prepared.py (switching prepared stances).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Protocol

import numpy as np
import torch

from . import xorbytes
from ..core.errors import DeltastoreError
from ..core.hashing import dtype_name
from .quantize import unscale


class TensorEntry(Protocol):
    """What this module reads of a version's tensor entry (repo/records.py's, a layer above)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    encoding: str
    params: dict[str, Any]
    objects: Mapping[str, Any]
    against_version: str | None


ENCODINGS = ("int4", "int8")
FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def decodes(entry: TensorEntry, base: torch.Tensor) -> bool:
    """Whether `entry` decodes on `base`'s device: a device other than the CPU, an int4, int8
    or lossless XOR entry stored against the base, of the base's dtype and shape. (An empty
    tensor decodes on the CPU: its parts are empty, and torch views none of them as fp16.)"""
    if base.device.type == "cpu" or not base.numel() or entry.against_version is not None \
            or entry.dtype != dtype_name(base.dtype) or tuple(entry.shape) != tuple(base.shape):
        return False
    if entry.encoding == "lossless":
        return entry.params.get("mode") == "xor" and "xor" in entry.objects
    return entry.encoding in ENCODINGS and base.dtype in FLOATS


def decode(entry: TensorEntry, parts: Mapping[str, Any], base: torch.Tensor) -> torch.Tensor:
    """The tensor apply produces for `entry` (see `decodes`), on `base`'s device; `parts` are
    its verified payloads (bytes, memoryviews or uint8 tensors on any device)."""
    on = {part: uint8_on(data, base.device) for part, data in parts.items()}
    if entry.encoding == "lossless":
        return xor_ungroup(on["xor"], base)
    return absmax(entry, on, base)


def uint8_on(data: Any, device: torch.device) -> torch.Tensor:
    """Payload bytes as a uint8 tensor of its own on `device` (copied once)."""
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if device.type == "cpu" or not len(data):
        return xorbytes.bytes_tensor(data).to(device)
    with warnings.catch_warnings():
        # A read-only buffer, viewed only for the copy to the device: nothing writes it.
        warnings.simplefilter("ignore", UserWarning)
        view = torch.from_numpy(np.frombuffer(data, dtype=np.uint8))
    return view.to(device)


def xor_ungroup(payload: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """xorbytes.byte_ungroup with the base's bytes XORed in."""
    itemsize = base.element_size()
    n = base.numel()
    if payload.numel() != n * itemsize:
        raise DeltastoreError(f"payload has {payload.numel()} bytes, the base {n * itemsize}")
    interleaved = payload.view(itemsize, n).t().contiguous().reshape(-1)
    interleaved ^= base.detach().contiguous().reshape(-1).view(torch.uint8)
    return interleaved.view(base.dtype).reshape(base.shape)


def absmax(entry: TensorEntry, parts: Mapping[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """quantize.absmax_decode plus the base, rounded once to the base's dtype
    (encodings._Delta.decode). Sizes are checked before any arithmetic."""
    params, n = entry.params, base.numel()
    g, exp = int(params["group_size"]), int(params["scale_exp"])
    codes, scales = parts["codes"], parts["scales"]
    groups = -(-n // g)
    want = n if entry.encoding == "int8" else (n + 1) // 2
    if codes.numel() != want or scales.numel() != 2 * groups:
        raise DeltastoreError(f"{entry.name}: {codes.numel()} code bytes and {scales.numel()} scale bytes "
                              f"do not fit {n} elements in groups of {g}")
    if entry.encoding == "int8":
        dw = codes.view(torch.int8).to(torch.float32)
    else:
        low = (codes & 0x0F).to(torch.float32) - 8
        high = (codes >> 4).to(torch.float32) - 8
        dw = torch.stack([low, high], dim=1).reshape(-1)[:n]
    s = unscale(scales.view(torch.float16), exp)
    whole = n // g
    dw[:whole * g].view(whole, g).mul_(s[:whole, None])
    if n % g:
        dw[whole * g:].mul_(s[whole])
    return dw.add_(base.detach().reshape(-1)).to(base.dtype).reshape(base.shape)


__all__ = ["ENCODINGS", "decodes", "decode", "uint8_on", "xor_ungroup", "absmax"]
