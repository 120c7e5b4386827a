"""Encodings of one tensor's delta: pure encode/decode pairs behind one registry.

An encoding turns (base tensor, fine-tuned tensor) into named byte parts plus JSON-able
params, and turns (base tensor, parts, params) back into the tensor that apply produces.
It touches no disk and knows nothing of objects or compression: the store compresses and
addresses every part. Adding an encoding is one class and one `register` line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Iterator, Mapping, Protocol

import numpy as np
import torch

from . import absmax, mixedrank as MR, quantize as Q
from .xorbytes import STREAM_FROM, as_bytes, byte_ungroup, bytes_tensor, xor_grouped, xor_planes
from ..core.errors import EncodingError
from ..core.hashing import DTYPES, dtype_name
from ..core.limits import shown



@dataclass(frozen=True)
class Encoded:
    parts: dict[str, bytes | memoryview]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Streamed:
    """An encoding whose payload `part` `chunks()` produces a piece at a time (each call starts
    over): the same bytes `encode` would return, never held whole; its other `parts`, small,
    held whole."""

    part: str
    size: int
    chunks: Callable[[], Iterator[memoryview]]
    params: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, bytes | memoryview] = field(default_factory=dict)


class Reading(Protocol):
    """A large tensor and its base, read a block at a time by every pass over them, each block's
    pages let go once read (a commit's engine/blockwise.py): what `Encoding.stream` reads
    through. A lossy stream hands it each slice of its result as decode will produce it."""

    #: Elements a slice of `result` holds, but the last (whole chunks of the caller's norms).
    step: int

    def pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(base, target) blocks as flat tensors, in order."""
        ...

    def done(self, start: int, end: int) -> None:
        """Elements `start`..`end` of both were read for this pass."""
        ...

    def result(self, start: int, end: int, data: np.ndarray) -> None:
        """The result's bytes of elements `start`..`end`, in order from element 0 each pass."""
        ...


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
               shape: tuple[int, ...], out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor apply produces. `out`: a contiguous CPU tensor of `dtype` and `shape`,
        not the base, that the result may be written into (memory already written is faster
        than fresh memory); the result is what is returned, `out` or not."""
        raise NotImplementedError

    #: True when encoding needs calibration (an option) to fit to: commit refuses it without.
    needs_calibration: ClassVar[bool] = False

    def stream(self, base: torch.Tensor, target: torch.Tensor, *, reading: Reading | None = None
               ) -> Streamed | None:
        """`encode` as a stream, where this encoding can and the tensor is large enough to
        gain from it; None otherwise. `reading`: the two tensors read a block at a time."""
        return None

    def for_tensor(self, name: str) -> "Encoding":
        """This encoding as it stores tensor `name` (one fitted per tensor knows it)."""
        return self


class Lossless(Encoding):
    """Exact: byte-grouped XOR of the bit patterns, or a raw copy where dtype or shape differ."""

    name = "lossless"
    exact = True

    def encode(self, base: torch.Tensor, target: torch.Tensor) -> Encoded:
        if target.numel() == 0:
            return Encoded({"raw": b""}, {"mode": "raw"})
        if base.dtype != target.dtype or base.shape != target.shape:
            return Encoded({"raw": memoryview(as_bytes(target).numpy().copy())}, {"mode": "raw"})
        return Encoded({"xor": xor_grouped(base, target)}, {"mode": "xor"})

    def stream(self, base: torch.Tensor, target: torch.Tensor, *, reading: Reading | None = None
               ) -> Streamed | None:
        size = target.numel() * target.element_size()
        if size < STREAM_FROM or base.dtype != target.dtype or base.shape != target.shape:
            return None
        blocks = reading.pairs if reading is not None else None
        return Streamed("xor", size, lambda: xor_planes(base, target, blocks=blocks), {"mode": "xor"})

    def decode(self, base: torch.Tensor, encoded: Encoded, *, dtype: torch.dtype,
               shape: tuple[int, ...], out: torch.Tensor | None = None) -> torch.Tensor:
        mode = encoded.params.get("mode")
        if mode in ("raw", "xor") and mode not in encoded.parts:
            raise EncodingError(f"a lossless {mode} entry needs a {mode!r} part, it has "
                                f"{', '.join(sorted(encoded.parts)) or 'none'}")
        if mode == "raw":
            data = _check_size(bytes_tensor(encoded.parts["raw"]), dtype, shape)
            if data.numel() == 0:
                return torch.empty(shape, dtype=dtype)
            return data.view(dtype).reshape(shape)
        if mode != "xor":
            raise EncodingError(f"unknown lossless mode {shown(mode)}")
        itemsize = base.element_size()
        if base.dtype != dtype or tuple(base.shape) != tuple(shape):
            raise EncodingError(f"an xor payload needs a base of dtype {dtype} and shape {tuple(shape)}")
        payload = encoded.parts["xor"]
        if len(payload) != base.numel() * itemsize:
            raise EncodingError(f"payload has {len(payload)} bytes, the entry declares {base.numel() * itemsize}")
        # In numpy: its single-threaded XOR does not wait on torch's thread pool (which costs
        # more than the XOR on a busy machine).
        into = as_bytes(out).numpy() if out is not None and out.numel() else None
        result = byte_ungroup(payload, itemsize, xor=as_bytes(base).numpy(), out=into)
        if result.numel() == 0:
            return torch.empty(shape, dtype=dtype)
        return result.view(dtype).reshape(shape)


def _check_size(data: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    expected = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    if data.numel() != expected:
        raise EncodingError(f"payload has {data.numel()} bytes, the entry declares {expected}")
    return data


# -- lossy encodings -----------------------------------------------------------------------
# The arithmetic and byte layouts live in quantize.py; these classes hold the options, check
# the tensor, and fix how apply's result is formed: (base in float32 + decoded dW), rounded
# once to the target's dtype. Decoding is elementwise or float64, so the result's bytes
# depend only on the parts and the base.


def _delta(base: torch.Tensor, target: torch.Tensor, spec: str) -> torch.Tensor:
    _check_pair(base, target, spec)
    return _delta_slice(base, target, spec)


def _check_pair(base: torch.Tensor, target: torch.Tensor, spec: str) -> None:
    if tuple(base.shape) != tuple(target.shape):
        raise EncodingError(f"{spec} needs a base and target of one shape, got {tuple(base.shape)} "
                            f"and {tuple(target.shape)}; keep this tensor lossless")
    if not (base.is_floating_point() and target.is_floating_point()):
        raise EncodingError(f"{spec} needs floating-point tensors, got {base.dtype} and {target.dtype}; "
                            "keep this tensor lossless")


def _delta_slice(base: torch.Tensor, target: torch.Tensor, spec: str) -> torch.Tensor:
    dw = target.detach().to("cpu", torch.float32) - base.detach().to("cpu", torch.float32)
    if not Q.all_finite(dw):
        raise EncodingError(f"the delta has inf or nan values, which {spec} cannot hold; keep this tensor lossless")
    return dw


class _Delta(Encoding):
    """A lossy encoding of dW = target - base, computed in float32."""

    def encode(self, base: torch.Tensor, target: torch.Tensor) -> Encoded:
        parts, params = self._encode(_delta(base, target, self.spec), tuple(target.shape))
        return Encoded(dict(parts), params)

    def decode(self, base: torch.Tensor, encoded: Encoded, *, dtype: torch.dtype,
               shape: tuple[int, ...], out: torch.Tensor | None = None) -> torch.Tensor:
        shape = tuple(int(d) for d in shape)
        if tuple(base.shape) != shape:
            raise EncodingError(f"{self.spec} needs a base of shape {shape}, got {tuple(base.shape)}")
        b = base.detach()
        if b.dtype == torch.float64 or b.device.type != "cpu":
            dw = self._decode(encoded, shape).reshape(shape).to(b.device)
            # float32 arithmetic, in place; a float64 base keeps its precision.
            return (b + dw if b.dtype == torch.float64 else dw.add_(b)).to(dtype)
        # The same float32 arithmetic, elementwise, a slice at a time: each slice of dW is
        # added and rounded while it is in the cache, and no whole-tensor float32 temporary
        # is allocated (on a big model, its page faults cost more than the arithmetic).
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        flat_out, flat_b = out.reshape(-1), b.reshape(-1)
        for start, dw in self._decode_slices(encoded, shape):
            end = start + dw.numel()
            flat_out[start:end].copy_(dw.add_(flat_b[start:end]))
        return out

    def _encode(self, dw: torch.Tensor, shape: tuple[int, ...]) -> tuple[Q.Parts, dict[str, Any]]:
        raise NotImplementedError

    def _decode(self, encoded: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def _decode_slices(self, encoded: Encoded, shape: tuple[int, ...]) -> Iterator[tuple[int, torch.Tensor]]:
        """(first element, flat float32 dW of the elements from there), covering the tensor
        in order. One slice unless the encoding can decode a part at a time."""
        yield 0, self._decode(encoded, shape).reshape(-1)


def _whole(value: Any, option: str, allowed: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise EncodingError(f"{option} must be {allowed}, got {shown(value)}")
    return value


@dataclass(frozen=True)
class _Absmax(_Delta):
    bits: ClassVar[int]
    group_size: int = 64

    def __post_init__(self) -> None:
        _whole(self.group_size, "group_size", "a positive whole number of elements per scale (default 64)")

    def encode(self, base: torch.Tensor, target: torch.Tensor) -> Encoded:
        # dW a slice at a time: a whole-tensor float32 delta of an embedding is two copies of
        # it in fresh memory, slower to allocate than to compute.
        _check_pair(base, target, self.spec)
        b, t = base.detach().reshape(-1), target.detach().reshape(-1)
        parts, params = Q.absmax_encode_slices(lambda start, end: _delta_slice(b[start:end], t[start:end], self.spec),
                                               t.numel(), bits=self.bits, group_size=self.group_size)
        return Encoded(dict(parts), params)

    def stream(self, base: torch.Tensor, target: torch.Tensor, *, reading: Reading | None = None
               ) -> Streamed | None:
        """The codes a slice at a time, each slice's result handed to `reading` as apply's numpy
        decode gives it (absmax.py), then its pages let go: a large mapped tensor is never held
        whole, nor are its codes. None without a `reading`, for a dtype numpy does not decode,
        or where a slice of whole groups would not also hold whole steps of `reading`."""
        dtype = dtype_name(target.dtype)
        step = math.lcm(reading.step, self.group_size, 2) if reading is not None else 0
        if reading is None or step > 4 * reading.step or dtype not in absmax.DTYPES \
                or (base.dtype, base.shape) != (target.dtype, target.shape):
            return None
        _check_pair(base, target, self.spec)
        b, t = base.detach().reshape(-1), target.detach().reshape(-1)
        n, g, itemsize = t.numel(), self.group_size, t.element_size()

        def delta(start: int, end: int) -> torch.Tensor:
            return _delta_slice(b[start:end], t[start:end], self.spec)

        def read_once(start: int, end: int) -> torch.Tensor:
            dw = delta(start, end)
            reading.done(start, end)
            return dw
        s16, exp = Q.absmax_scales(read_once, n, bits=self.bits, group_size=g, slice_elements=step)
        params, scales = {"group_size": g, "scale_exp": exp}, memoryview(as_bytes(s16).numpy())

        def chunks() -> Iterator[memoryview]:
            out = np.empty(min(step, n) * itemsize, dtype=np.uint8)
            for start, end, codes in Q.absmax_codes(delta, n, Q.unscale(s16, exp), bits=self.bits, group_size=g,
                                                    slice_elements=step):
                result = out[:(end - start) * itemsize]
                first, last = absmax.block_bytes(params, bits=self.bits, first=start, end=end)
                absmax.decode_into({"codes": memoryview(codes).cast("B"),
                                    "scales": scales[first["scales"]:last["scales"]]}, params, bits=self.bits,
                                   base=as_bytes(b[start:end]).numpy(), base_dtype=dtype, out=result, dtype=dtype)
                reading.result(start, end, result)
                reading.done(start, end)
                yield memoryview(codes).cast("B")
        size = n if self.bits == 8 else (n + 1) // 2
        return Streamed("codes", size, chunks, params, {"scales": scales})

    def _encode(self, dw: torch.Tensor, shape: tuple[int, ...]) -> tuple[Q.Parts, dict[str, Any]]:
        return Q.absmax_encode(dw, bits=self.bits, group_size=self.group_size)

    def _decode(self, encoded: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
        return Q.absmax_decode(encoded.parts, encoded.params, bits=self.bits, numel=math.prod(shape))

    def _decode_slices(self, encoded: Encoded, shape: tuple[int, ...]) -> Iterator[tuple[int, torch.Tensor]]:
        return Q.absmax_decode_slices(encoded.parts, encoded.params, bits=self.bits, numel=math.prod(shape))


@dataclass(frozen=True)
class Int8(_Absmax):
    """int8 codes and one fp16 scale per `group_size` elements. Parts `codes`, `scales`;
    params `group_size`, `scale_exp` (layout: quantize.py)."""

    name = "int8"
    bits = 8


@dataclass(frozen=True)
class Int4(_Absmax):
    """int4 codes q in [-7, 7] stored as q + 8, two per byte, element 2i in the LOW nibble and
    2i+1 in the high nibble (an odd count pads with 8); one fp16 scale per `group_size`
    elements. Parts `codes`, `scales`; params `group_size`, `scale_exp`."""

    name = "int4"
    bits = 4


@dataclass(frozen=True)
class _Bnb(_Delta):
    quant_type: ClassVar[str]
    blocksize: int = 64

    def __post_init__(self) -> None:
        if self.blocksize not in Q.BNB_BLOCKSIZES or isinstance(self.blocksize, bool):
            raise EncodingError(f"blocksize must be one of {', '.join(map(str, Q.BNB_BLOCKSIZES))} "
                                f"(bitsandbytes' block sizes), got {shown(self.blocksize)}")

    def _encode(self, dw: torch.Tensor, shape: tuple[int, ...]) -> tuple[Q.Parts, dict[str, Any]]:
        return Q.bnb_encode(dw, quant_type=self.quant_type, blocksize=self.blocksize)

    def _decode(self, encoded: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
        return Q.bnb_decode(encoded.parts, encoded.params, quant_type=self.quant_type, numel=math.prod(shape))


@dataclass(frozen=True)
class NF4(_Bnb):
    """bitsandbytes NF4 of the flattened delta: parts `data` (packed, element 2i in the HIGH
    nibble), `absmax` (float32 per block), `code` (the float32 table); params `quant_type`,
    `blocksize`, `quant_shape`, `quant_dtype`: the QuantState decoding rebuilds."""

    name = "nf4"
    quant_type = "nf4"


@dataclass(frozen=True)
class FP4(_Bnb):
    """bitsandbytes FP4; the same parts and params as NF4."""

    name = "fp4"
    quant_type = "fp4"


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


@dataclass(frozen=True)
class OneBit(_Delta):
    """The sign of dW, 8 per byte, least significant bit first (1 = positive), and one fp16
    scale per row (dimension 0), the row's mean |dW|. Parts `signs`, `scales`; param `scale_exp`."""

    name = "1bit"

    def _encode(self, dw: torch.Tensor, shape: tuple[int, ...]) -> tuple[Q.Parts, dict[str, Any]]:
        return Q.sign_encode(dw.reshape(_rows_cols(shape)))

    def _decode(self, encoded: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
        rows, cols = _rows_cols(shape)
        return Q.sign_decode(encoded.parts, encoded.params, rows=rows, cols=cols)


@dataclass(frozen=True)
class LowRank(_Delta):
    """The best rank-R approximation of a 2-D dW: parts `us` (U*S * 2**-scale_exp, m x R) and
    `vh` (R x n), row-major in `dtype` (bf16, fp16 or fp32); params `rank`, `dtype`, `scale_exp`."""

    name = "lowrank"
    rank: int = 32
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        _whole(self.rank, "the rank of lowrank:R", "a positive whole number, e.g. lowrank:32")
        dtype = self.dtype.lower() if isinstance(self.dtype, str) else None
        if dtype not in Q.FACTOR_DTYPES:
            raise EncodingError(f"dtype of lowrank must be one of {', '.join(Q.FACTOR_DTYPES)}, got {shown(self.dtype)}")
        object.__setattr__(self, "dtype", dtype)

    @property
    def spec(self) -> str:
        return f"lowrank:{self.rank}"

    def encode(self, base: torch.Tensor, target: torch.Tensor, *, basis: Q.GramBasis | None = None) -> Encoded:
        """`basis`: ``quantize.gram_basis`` of this very delta, made once for several ranks
        (compare's LoRA rows, ``commit --encoding auto``); the same bytes as without it."""
        parts, params = self._encode(_delta(base, target, self.spec), tuple(target.shape), basis)
        return Encoded(dict(parts), params)

    def _encode(self, dw: torch.Tensor, shape: tuple[int, ...],
                basis: Q.GramBasis | None = None) -> tuple[Q.Parts, dict[str, Any]]:
        if len(shape) != 2:
            raise EncodingError(f"{self.spec} needs a 2-D tensor, got shape {shape}; keep this tensor lossless")
        largest = min(shape)
        if self.rank > largest:
            raise EncodingError(f"{self.spec} is more than a {shape[0]}x{shape[1]} tensor can hold; "
                                f"the rank must be at most {largest} (lowrank:{largest})")
        return Q.lowrank_encode(dw, rank=self.rank, dtype=self.dtype, basis=basis)

    def _decode(self, encoded: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) != 2:
            raise EncodingError(f"{self.spec} decodes only 2-D tensors, the entry declares shape {shape}")
        return Q.lowrank_decode(encoded.parts, encoded.params, rows=shape[0], cols=shape[1])


@dataclass(frozen=True)
class MixedRank(_Delta):
    """A 2-D dW's singular directions at mixed widths (1 to 8 bits each, more for the larger
    ones), in the bytes of a bf16 lowrank:R. Parts `u`, `u_scales`, `v`, `v_scales`; params
    `bits`, `group_size`, `u_exp`, `v_exp` (layout: mixedrank.py)."""

    name = "mixedrank"
    rank: int = 32
    group_size: int = 64

    def __post_init__(self) -> None:
        _whole(self.rank, "the rank of mixedrank:R", "a positive whole number, e.g. mixedrank:32")
        _whole(self.group_size, "group_size", "a positive whole number of elements per scale (default 64)")

    @property
    def spec(self) -> str:
        return f"mixedrank:{self.rank}"

    def _encode(self, dw: torch.Tensor, shape: tuple[int, ...]) -> tuple[Q.Parts, dict[str, Any]]:
        if len(shape) != 2:
            raise EncodingError(f"{self.spec} needs a 2-D tensor, got shape {shape}; keep this tensor lossless")
        return MR.encode(dw, rank=self.rank, group_size=self.group_size, covariance=self._covariance(shape))

    def _covariance(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The inputs' covariance the fit is weighted by; None: the weights themselves."""
        return None

    def _decode(self, encoded: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) != 2:
            raise EncodingError(f"{self.spec} decodes only 2-D tensors, the entry declares shape {shape}")
        return MR.decode(encoded.parts, encoded.params, rows=shape[0], cols=shape[1])


@dataclass(frozen=True)
class MixedRankAW(MixedRank):
    """mixedrank:R fitted to the model's activations on calibration prompts: the directions and
    widths that keep the layer's outputs, ||(dW - dW') x|| over the inputs x, rather than its
    weights. The layout and decoding are mixedrank's. `calibration`: tensor name -> the n x n
    sum of x x^T of the inputs that tensor (a linear layer's weight) met; a tensor without one
    (an embedding) is fitted as mixedrank fits it."""

    name = "mixedrank-aw"
    needs_calibration = True
    calibration: Mapping[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    tensor: str | None = None

    @property
    def spec(self) -> str:
        return f"mixedrank-aw:{self.rank}"

    def for_tensor(self, name: str) -> Encoding:
        return replace(self, tensor=name)

    def _covariance(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        if self.calibration is None:
            raise EncodingError(f"{self.spec} is fitted on the model's activations: give --calibration FILE "
                                "(prompts, one per line, that the encoding is fitted on)")
        covariance = self.calibration.get(self.tensor) if self.tensor is not None else None
        if covariance is not None and tuple(covariance.shape) != (shape[-1], shape[-1]):
            return None  # not this tensor's inputs (a tied head's weight read as an embedding)
        return covariance


# -- registry ------------------------------------------------------------------------------

Factory = Callable[[str | None, dict[str, Any]], Encoding]

#: name -> factory(argument after the colon or None, options) -> Encoding
_REGISTRY: dict[str, Factory] = {}
#: name -> the options its factory takes (and its encoded params record)
_OPTIONS: dict[str, tuple[str, ...]] = {}


def register(name: str, factory: Factory, options: tuple[str, ...] = ()) -> None:
    _REGISTRY[name] = factory
    _OPTIONS[name] = tuple(options)


def names() -> list[str]:
    return sorted(_REGISTRY)


def option_names(spec: str) -> tuple[str, ...]:
    """The options the encoding a spec names takes (`group_size` for `int4`)."""
    return _OPTIONS.get(spec.partition(":")[0], ())


def get(spec: str, **options: Any) -> Encoding:
    """The encoding a spec names: `lossless`, `int4`, `lowrank:32`, ...

    Options set to None count as not given. An option that only other encodings take is
    ignored, so that one set of command-line options can go with every tensor's spec; a name
    that no encoding takes is an error.
    """
    name, _, arg = spec.partition(":")
    factory = _REGISTRY.get(name)
    if factory is None:
        raise EncodingError(f"unknown encoding {shown(spec)}; known: {', '.join(names())} (lowrank and mixedrank as NAME:R)")
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(k for k in given if not any(k in opts for opts in _OPTIONS.values()))
    if unknown:
        known = "; ".join(f"{', '.join(opts)} ({n})" for n, opts in sorted(_OPTIONS.items()) if opts)
        raise EncodingError(f"unknown encoding option {', '.join(unknown)}; known options: {known}")
    return factory(arg or None, {k: v for k, v in given.items() if k in _OPTIONS[name]})


def from_params(spec: str, params: Mapping[str, Any]) -> Encoding:
    """The encoding that decodes an entry, rebuilt from what its manifest recorded."""
    return get(spec, **{k: params[k] for k in option_names(spec) if k in params})


def _no_arg(cls: Callable[..., Encoding]) -> Factory:
    def factory(arg: str | None, options: dict[str, Any]) -> Encoding:
        if arg is not None:
            raise EncodingError(f"encoding {cls.name!r} takes no argument (got {cls.name}:{arg[:40]})")
        return cls(**options)
    return factory


def _ranked(cls: Callable[..., Encoding]) -> Factory:
    def factory(arg: str | None, options: dict[str, Any]) -> Encoding:
        # isdigit() alone admits '²' and 5000-digit strings, which int() refuses.
        if arg is None or not (arg.isascii() and arg.isdigit() and len(arg) <= 9) or int(arg) <= 0:
            spec = cls.name if arg is None else f"{cls.name}:{arg[:40]}"
            raise EncodingError(f"{spec}: {cls.name} needs a positive whole rank, as {cls.name}:R "
                                f"(e.g. {cls.name}:32)")
        return cls(int(arg), **options)
    return factory


register("lossless", _no_arg(Lossless))
register("int8", _no_arg(Int8), ("group_size",))
register("int4", _no_arg(Int4), ("group_size",))
register("nf4", _no_arg(NF4), ("blocksize",))
register("fp4", _no_arg(FP4), ("blocksize",))
register("1bit", _no_arg(OneBit))
register("lowrank", _ranked(LowRank), ("dtype",))
register("mixedrank", _ranked(MixedRank), ("group_size",))
register("mixedrank-aw", _ranked(MixedRankAW), ("group_size", "calibration"))

__all__ = ["Encoded", "Encoding", "Lossless", "Int8", "Int4", "NF4", "FP4", "OneBit", "LowRank", "MixedRank", "MixedRankAW",
           "get", "from_params", "names", "option_names", "register",
           "DTYPES", "dtype_name"]
