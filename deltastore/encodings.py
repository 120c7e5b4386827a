"""Encodings of one tensor's delta: pure encode/decode pairs behind one registry.

An encoding turns (base tensor, fine-tuned tensor) into named byte parts plus JSON-able
params, and turns (base tensor, parts, params) back into the tensor that apply produces.
It touches no disk and knows nothing of objects or compression: the store compresses and
addresses every part. Adding an encoding is one class and one `register` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from .errors import EncodingError
from .hashing import DTYPES, dtype_name

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Encoded:
    parts: dict[str, bytes | memoryview]
    params: dict[str, Any] = field(default_factory=dict)


class Encoding:
    """One way of storing a delta. Subclasses set `name` and implement the pair."""

    name: ClassVar[str]
    #: True when decode gives back the fine-tuned tensor bit for bit.
    exact: ClassVar[bool] = False

    @property
    def spec(self) -> str:
        """The string that names this encoding with its options (`lowrank:32`)."""
        return self.name

    def encode(self, base: torch.Tensor, target: torch.Tensor) -> Encoded:
        raise NotImplementedError

    def decode(self, base: torch.Tensor, encoded: Encoded, *, dtype: torch.dtype,
               shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _bytes_tensor(data: bytes | memoryview) -> torch.Tensor:
    if not len(data):
        return torch.empty(0, dtype=torch.uint8)
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def byte_group(raw: torch.Tensor, itemsize: int) -> memoryview:
    """All first bytes of every element, then all second bytes, ...: zstd finds far more
    runs this way, because the high bytes (sign, exponent) of a small delta are mostly equal."""
    src = raw.numpy()
    if itemsize == 1:
        return memoryview(src.copy())
    n = src.size // itemsize
    out = np.empty(src.size, dtype=np.uint8)
    # Strided slices copy several times faster than a transpose of an (n, itemsize) view.
    for k in range(itemsize):
        out[k * n:(k + 1) * n] = src[k::itemsize]
    return memoryview(out)


def byte_ungroup(data: bytes | memoryview, itemsize: int) -> torch.Tensor:
    src = np.frombuffer(data, dtype=np.uint8) if len(data) else np.empty(0, dtype=np.uint8)
    if itemsize == 1:
        return torch.from_numpy(src.copy())
    n = src.size // itemsize
    if n * itemsize != src.size:
        raise EncodingError(f"payload of {src.size} bytes is not a whole number of {itemsize}-byte elements")
    out = np.empty(src.size, dtype=np.uint8)
    for k in range(itemsize):
        out[k::itemsize] = src[k * n:(k + 1) * n]
    return torch.from_numpy(out)


class Lossless(Encoding):
    """Exact: byte-grouped XOR of the bit patterns, or a raw copy where dtype or shape differ."""

    name = "lossless"
    exact = True

    def encode(self, base: torch.Tensor, target: torch.Tensor) -> Encoded:
        itemsize = target.element_size()
        if target.numel() == 0:
            return Encoded({"raw": b""}, {"mode": "raw"})
        if base.dtype != target.dtype or base.shape != target.shape:
            return Encoded({"raw": memoryview(_as_bytes(target).numpy().copy())}, {"mode": "raw"})
        as_int = _INT_OF_SIZE[itemsize]
        xor = torch.bitwise_xor(_as_bytes(base).view(as_int), _as_bytes(target).view(as_int))
        return Encoded({"xor": byte_group(xor.view(torch.uint8), itemsize)}, {"mode": "xor"})

    def decode(self, base: torch.Tensor, encoded: Encoded, *, dtype: torch.dtype,
               shape: tuple[int, ...]) -> torch.Tensor:
        mode = encoded.params.get("mode")
        if mode == "raw":
            data = _check_size(_bytes_tensor(encoded.parts["raw"]), dtype, shape)
            if data.numel() == 0:
                return torch.empty(shape, dtype=dtype)
            return data.view(dtype).reshape(shape)
        if mode != "xor":
            raise EncodingError(f"unknown lossless mode {mode!r}")
        itemsize = base.element_size()
        if base.dtype != dtype or tuple(base.shape) != tuple(shape):
            raise EncodingError(f"an xor payload needs a base of dtype {dtype} and shape {tuple(shape)}")
        xor = _check_size(byte_ungroup(encoded.parts["xor"], itemsize), dtype, shape)
        as_int = _INT_OF_SIZE[itemsize]
        out = torch.bitwise_xor(_as_bytes(base).view(as_int), xor.view(as_int))
        return out.view(torch.uint8).view(dtype).reshape(shape)


def _check_size(data: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    expected = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    if data.numel() != expected:
        raise EncodingError(f"payload has {data.numel()} bytes, the entry declares {expected}")
    return data


# -- registry ------------------------------------------------------------------------------

#: name -> factory(argument after the colon or None, options) -> Encoding
_REGISTRY: dict[str, Callable[[str | None, dict[str, Any]], Encoding]] = {}


def register(name: str, factory: Callable[[str | None, dict[str, Any]], Encoding]) -> None:
    _REGISTRY[name] = factory


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(spec: str, **options: Any) -> Encoding:
    """The encoding a spec names: `lossless`, `int4`, `lowrank:32`, ..."""
    name, _, arg = spec.partition(":")
    factory = _REGISTRY.get(name)
    if factory is None:
        raise EncodingError(f"unknown encoding {spec!r}; known: {', '.join(names())}")
    return factory(arg or None, options)


def from_params(spec: str, params: dict[str, Any]) -> Encoding:
    """The encoding that decodes an entry, rebuilt from what its manifest recorded."""
    return get(spec, **{k: v for k, v in params.items() if k in ("group_size", "blocksize")})


def _no_arg(cls: type[Encoding]) -> Callable[[str | None, dict[str, Any]], Encoding]:
    def factory(arg: str | None, options: dict[str, Any]) -> Encoding:
        if arg is not None:
            raise EncodingError(f"encoding {cls.name!r} takes no argument (got {cls.name}:{arg})")
        return cls()
    return factory


register("lossless", _no_arg(Lossless))

__all__ = ["Encoded", "Encoding", "Lossless", "get", "from_params", "names", "register",
           "byte_group", "byte_ungroup", "DTYPES", "dtype_name"]
