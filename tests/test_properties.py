"""Properties of every encode/decode pair, over generated tensors: dtypes (fp32, bf16, fp16,
int8 and the rest), shapes (0-d, 1-d, empty, sizes that fill no group, a large first
dimension) and values (zeros, every bit pattern, nan and inf in the fine-tune).

- lossless gives back the fine-tuned tensor bit for bit, whatever its bits;
- each lossy encoding is deterministic, keeps dtype and shape, rebuilds from its params, gives
  back the base for a zero delta, stays within its error bound, and refuses a non-finite delta;
- a commit refuses a changed tensor holding nan or inf, naming it and storing nothing, unless
  allowed; then a lossless version gives it back exactly and a lossy one refuses it by name.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from deltastore import Store
from deltastore.codecs import encodings
from deltastore.codecs import quantize as Q
from deltastore.codecs.encodings import Encoded
from deltastore.core.errors import EncodingError, NonFiniteTensor
from deltastore.core.hashing import DTYPES, tensor_id

from helpers import raw, store_snapshot

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
PROFILE = settings(deadline=None, derandomize=True, database=None, max_examples=60,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
ALL_DTYPES = list(DTYPES.values())


# -- strategies ------------------------------------------------------------------------------------


def shapes(*, min_dims: int = 0, max_dims: int = 3, max_numel: int = 600) -> st.SearchStrategy:
    """0-d, 1-d, empty, odd sizes that fill no group of 64, and a large first dimension."""
    dims = st.lists(st.integers(0, 70), min_size=min_dims, max_size=max_dims)
    large_first = st.tuples(st.integers(1000, 5000), st.integers(1, 2)).map(list)
    return st.one_of(dims.filter(lambda s: math.prod(s) <= max_numel), large_first).map(tuple)


@st.composite
def any_tensor(draw, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Any bit pattern of `dtype` (nan payloads, infinities, subnormals, negative zero)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    n = math.prod(shape)
    seed = draw(st.integers(0, 2**32 - 1))
    data = np.random.default_rng(seed).integers(0, 256, size=n * itemsize, dtype=np.uint8)
    if dtype == torch.bool:
        data &= 1
    t = torch.from_numpy(data).view(dtype) if n else torch.empty(0, dtype=dtype)
    return t.reshape(shape)


@st.composite
def float_pair(draw, *, min_dims: int = 1, lowrank: bool = False):
    """(base, target) of one float dtype and shape, target = base + a delta of some scale."""
    dtype = draw(st.sampled_from(FLOATS))
    shape = draw(shapes(min_dims=2 if lowrank else min_dims, max_dims=2 if lowrank else 3))
    seed = draw(st.integers(0, 2**32 - 1))
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * draw(st.sampled_from([1e-3, 0.02, 1.0, 30.0]))).to(dtype)
    kind = draw(st.sampled_from(["dense", "zero", "sparse", "mixed-scale"]))
    scale = draw(st.sampled_from([2.0**-20, 1e-4, 1e-2, 1.0]))
    delta = torch.randn(shape, generator=g) * scale
    if kind == "zero":
        delta.zero_()
    elif kind == "sparse":
        delta *= torch.rand(shape, generator=g) < 0.05
    elif kind == "mixed-scale" and delta.numel():
        delta.view(-1)[: delta.numel() // 2] *= 1e-6  # groups far apart in size
    target = (base.float() + delta).to(dtype)
    return base, target


def byte_view(t: torch.Tensor) -> bytes:
    return raw(t)


# -- lossless --------------------------------------------------------------------------------------


@PROFILE
@given(data=st.data(), dtype=st.sampled_from(ALL_DTYPES), shape=shapes())
def test_lossless_gives_back_every_bit_pattern(data, dtype, shape):
    base = data.draw(any_tensor(dtype, shape))
    target = data.draw(any_tensor(dtype, shape))
    enc = encodings.get("lossless")
    encoded = enc.encode(base, target)
    out = enc.decode(base, encoded, dtype=dtype, shape=shape)
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert byte_view(out) == byte_view(target)
    assert tensor_id(out) == tensor_id(target)


@PROFILE
@given(data=st.data(), base_dtype=st.sampled_from(ALL_DTYPES), dtype=st.sampled_from(ALL_DTYPES),
       base_shape=shapes(), shape=shapes())
def test_lossless_raw_copy_where_dtype_or_shape_differ(data, base_dtype, dtype, base_shape, shape):
    assume(base_dtype != dtype or base_shape != shape)
    base = data.draw(any_tensor(base_dtype, base_shape))
    target = data.draw(any_tensor(dtype, shape))
    enc = encodings.get("lossless")
    encoded = enc.encode(base, target)
    assert encoded.params == {"mode": "raw"}
    out = enc.decode(base, encoded, dtype=dtype, shape=shape)
    assert byte_view(out) == byte_view(target) and out.dtype == dtype and tuple(out.shape) == shape


@PROFILE
@given(data=st.data(), dtype=st.sampled_from(ALL_DTYPES), shape=shapes(min_dims=1))
def test_lossless_refuses_a_payload_of_another_size(data, dtype, shape):
    assume(math.prod(shape) > 0)
    base = data.draw(any_tensor(dtype, shape))
    target = data.draw(any_tensor(dtype, shape))
    enc = encodings.get("lossless")
    encoded = enc.encode(base, target)
    (part, payload), = encoded.parts.items()
    cut = bytes(payload)[:-1]
    with pytest.raises(EncodingError):
        enc.decode(base, Encoded({part: cut}, encoded.params), dtype=dtype, shape=shape)


# -- lossy ----------------------------------------------------------------------------------------


def _roundtrip(spec: str, base: torch.Tensor, target: torch.Tensor) -> tuple[Encoded, torch.Tensor]:
    enc = encodings.get(spec)
    encoded = enc.encode(base, target)
    again = enc.encode(base, target)
    assert {k: bytes(v) for k, v in encoded.parts.items()} == {k: bytes(v) for k, v in again.parts.items()}
    assert encoded.params == again.params
    shape = tuple(target.shape)
    out = enc.decode(base, encoded, dtype=target.dtype, shape=shape)
    assert out.dtype == target.dtype and tuple(out.shape) == shape
    rebuilt = encodings.from_params(enc.spec, encoded.params)
    assert byte_view(rebuilt.decode(base, encoded, dtype=target.dtype, shape=shape)) == byte_view(out)
    return encoded, out


@PROFILE
@given(pair=float_pair(), spec=st.sampled_from(["int8", "int4", "nf4", "fp4", "1bit"]))
def test_lossy_round_trip_is_deterministic_and_keeps_dtype_and_shape(pair, spec):
    if spec in ("nf4", "fp4") and not HAVE_BNB:
        pytest.skip("bitsandbytes is not installed")
    base, target = pair
    _roundtrip(spec, base, target)


@PROFILE
@given(pair=float_pair(lowrank=True), rank=st.integers(1, 4), family=st.sampled_from(["lowrank", "mixedrank"]))
def test_lowrank_round_trip_is_deterministic_and_keeps_dtype_and_shape(pair, rank, family):
    base, target = pair
    assume(rank <= min(target.shape))
    _roundtrip(f"{family}:{rank}", base, target)


@PROFILE
@given(pair=float_pair(), spec=st.sampled_from(["int8", "int4", "nf4", "fp4", "1bit", "lowrank:1", "mixedrank:1"]))
def test_a_zero_delta_gives_back_the_base(pair, spec):
    if spec in ("nf4", "fp4") and not HAVE_BNB:
        pytest.skip("bitsandbytes is not installed")
    base, _ = pair
    if ":" in spec:  # lowrank:R, mixedrank:R
        assume(base.dim() == 2 and min(base.shape) >= 1)
    out = encodings.get(spec).decode(base, encodings.get(spec).encode(base, base.clone()),
                                     dtype=base.dtype, shape=tuple(base.shape))
    assert byte_view(out) == byte_view(base)


def _delta(pair) -> torch.Tensor:
    base, target = pair
    return (target.float() - base.float()).reshape(-1)


@PROFILE
@given(pair=float_pair(), bits=st.sampled_from([8, 4]), group=st.sampled_from([1, 7, 64, 100]))
def test_absmax_error_is_at_most_half_a_step_of_its_group(pair, bits, group):
    dw = _delta(pair)
    parts, params = Q.absmax_encode(dw, bits=bits, group_size=group)
    out = Q.absmax_decode(parts, params, bits=bits, numel=dw.numel())
    if not dw.numel():
        return
    qmax = (1 << (bits - 1)) - 1
    n_groups = -(-dw.numel() // group)
    padded = torch.zeros(n_groups * group)
    padded[:dw.numel()] = dw.abs()
    step = (padded.view(n_groups, group).amax(dim=1) / qmax).repeat_interleave(group)[:dw.numel()]
    # Half a step, the fp16 rounding of the step, and scales that fp16 (shifted to the largest
    # scale's range) cannot hold: those 2**-38 below the largest come out as zero.
    bound = 0.5 * step * (1 + 2**-9) + qmax * float(step.max()) * 2.0**-38 + 1e-37
    assert bool(((out - dw).abs() <= bound).all())


@PROFILE
@given(pair=float_pair())
def test_1bit_keeps_each_sign_and_one_magnitude_per_row(pair):
    dw = _delta(pair)
    shape = tuple(pair[1].shape)
    rows, cols = (1, math.prod(shape)) if len(shape) < 2 else (shape[0], math.prod(shape[1:]))
    parts, params = Q.sign_encode(dw.reshape(rows, cols))
    out = Q.sign_decode(parts, params, rows=rows, cols=cols)
    d = dw.reshape(rows, cols)
    assert bool((out[d > 0] >= 0).all()) and bool((out[d <= 0] <= 0).all())
    assert bool((out.abs() == out.abs().amax(dim=1, keepdim=True)).all()) if cols else True


@PROFILE
@given(pair=float_pair(), quant_type=st.sampled_from(["nf4", "fp4"]), blocksize=st.sampled_from([64, 256]))
def test_4bit_error_is_at_most_half_the_widest_gap_of_its_table(pair, quant_type, blocksize):
    if not HAVE_BNB:
        pytest.skip("bitsandbytes is not installed")
    dw = _delta(pair)
    parts, params = Q.bnb_encode(dw, quant_type=quant_type, blocksize=blocksize)
    out = Q.bnb_decode(parts, params, quant_type=quant_type, numel=dw.numel())
    if not dw.numel():
        return
    code = torch.frombuffer(bytearray(bytes(parts["code"])), dtype=torch.float32).sort().values
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    n = dw.numel() + dw.numel() % 2
    padded = torch.zeros(-(-n // blocksize) * blocksize)
    padded[:dw.numel()] = dw.abs()
    absmax = padded.view(-1, blocksize).amax(dim=1).repeat_interleave(blocksize)[:dw.numel()]
    assert bool(((out - dw).abs() <= absmax * half_gap * (1 + 1e-3) + 1e-37).all())


@PROFILE
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 3000), cols=st.integers(1, 40),
       true_rank=st.integers(1, 3), dtype=st.sampled_from(FLOATS))
def test_lowrank_holds_a_delta_of_its_rank(seed, rows, cols, true_rank, dtype):
    assume(true_rank <= min(rows, cols))
    g = torch.Generator().manual_seed(seed)
    dw = torch.randn(rows, true_rank, generator=g) @ torch.randn(true_rank, cols, generator=g) * 1e-3
    parts, params = Q.lowrank_encode(dw, rank=true_rank, dtype="fp32")
    out = Q.lowrank_decode(parts, params, rows=rows, cols=cols)
    assert float((out - dw).norm()) <= 1e-3 * float(dw.norm()) + 1e-30


@PROFILE
@given(pair=float_pair(lowrank=True), spec=st.sampled_from(["int8", "int4", "nf4", "fp4", "1bit", "lowrank:1", "mixedrank:1"]),
       bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_lossy_encodings_refuse_a_non_finite_delta(pair, spec, bad):
    if spec in ("nf4", "fp4") and not HAVE_BNB:
        pytest.skip("bitsandbytes is not installed")
    base, target = pair
    assume(target.numel() > 0)
    target = target.clone()
    target.view(-1)[target.numel() // 2] = bad
    with pytest.raises(EncodingError, match="inf or nan"):
        encodings.get(spec).encode(base, target)


# -- commits with non-finite values ------------------------------------------------------------------

COMMIT_PROFILE = settings(PROFILE, max_examples=12)


@st.composite
def model_pair(draw):
    """A small base of mixed dtypes and shapes, and a fine-tune changing some of its tensors."""
    names = draw(st.lists(st.sampled_from(["embed.weight", "layers.0.w", "layers.0.b", "layers.0.scale",
                                           "layers.1.codes", "layers.1.empty", "head.weight"]),
                          min_size=2, max_size=7, unique=True))
    base, ft = {}, {}
    for name in sorted(names):
        dtype = draw(st.sampled_from(FLOATS + [torch.int8]))
        shape = draw(shapes(max_numel=300))
        b = draw(any_tensor(torch.float32, shape)).nan_to_num(0.0, 0.0, 0.0).clamp(-4, 4).to(dtype) \
            if dtype != torch.int8 else draw(any_tensor(torch.int8, shape))
        base[name] = b
        if draw(st.booleans()) and b.numel():
            ft[name] = (b.float() + 0.25).to(dtype) if dtype != torch.int8 else b ^ 1
        else:
            ft[name] = b.clone()
    return base, ft


def _store(tmp: str, base: dict) -> Store:
    store = Store.init(Path(tmp) / "store")
    store.add_base(base, name="base")
    return store


def _inject(ft: dict, rng_value: int, bad: float) -> str | None:
    floats = sorted(n for n, t in ft.items() if t.is_floating_point() and t.numel())
    if not floats:
        return None
    name = floats[rng_value % len(floats)]
    ft[name] = ft[name].clone()
    ft[name].view(-1)[rng_value % ft[name].numel()] = bad
    return name


@COMMIT_PROFILE
@given(models=model_pair(), at=st.integers(0, 10_000), bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_a_commit_refuses_nan_or_inf_naming_the_tensor_unless_allowed(models, at, bad):
    base, ft = models
    name = _inject(ft, at, bad)
    assume(name is not None)
    with tempfile.TemporaryDirectory() as tmp:
        store = _store(tmp, base)
        before = store_snapshot(store.root)
        with pytest.raises(NonFiniteTensor, match=f"tensor {name!r} of the fine-tune holds") as e:
            store.commit("s", ft, base="base", base_weights=base, force=True)
        assert e.value.name == name and e.value.count >= 1
        assert store_snapshot(store.root) == before
        # Allowed: lossless stores it exactly, nan payload bits included.
        v = store.commit("s", ft, base="base", base_weights=base, allow_nonfinite=True, force=True).version
        got = dict(store.tensors(v, base_weights=base))
        assert sorted(got) == sorted(ft)
        assert all(byte_view(got[n]) == byte_view(ft[n]) and got[n].dtype == ft[n].dtype for n in ft)
        # A lossy encoding cannot hold it, and says which tensor to keep lossless.
        if ft[name].dim() >= 2:
            with pytest.raises(EncodingError, match=f"tensor {name!r}: .*inf or nan"):
                store.commit("s", ft, base="base", base_weights=base, encoding="int8", allow_nonfinite=True,
                             force=True)
        store.close()


@COMMIT_PROFILE
@given(models=model_pair(), spec=st.sampled_from(["lossless", "int8", "int4", "1bit", "lowrank:1", "mixedrank:1"]))
def test_a_commit_reads_back_what_its_entries_record(models, spec):
    base, ft = models
    with tempfile.TemporaryDirectory() as tmp:
        store = _store(tmp, base)
        v = store.commit("s", ft, base="base", base_weights=base, encoding=spec, force=True).version
        got = dict(store.tensors(v, base_weights=base))  # checks every result against its id
        for e in v.tensors:
            assert tensor_id(got[e.name]) == e.result_tensor_id
            if e.encoding == "lossless":
                assert byte_view(got[e.name]) == byte_view(ft[e.name])
        for name in ft:
            if v.entry(name) is None:
                assert byte_view(got[name]) == byte_view(base[name])
            assert got[name].dtype == ft[name].dtype and got[name].shape == ft[name].shape
        store.close()


def test_the_command_line_refuses_nan_naming_the_tensor_and_allow_nonfinite_stores_it(tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from cli.main import cli

    base = {"layers.0.w": torch.randn(8, 8), "layers.0.b": torch.randn(8)}
    ft = {k: v + 0.1 for k, v in base.items()}
    ft["layers.0.w"][3, 4] = math.nan
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    s = ["--store", str(tmp_path / "store")]
    runner = CliRunner()
    assert runner.invoke(cli, ["init", str(tmp_path / "store")]).exit_code == 0
    assert runner.invoke(cli, [*s, "base", "add", str(tmp_path / "base.safetensors"), "--name", "b"]).exit_code == 0
    r = runner.invoke(cli, [*s, "commit", "x", str(tmp_path / "ft.safetensors"), "--base", "b"])
    assert r.exit_code == 1 and "'layers.0.w'" in r.stderr and "--allow-nonfinite" in r.stderr
    assert r.stderr.count("\n") == 1
    r = runner.invoke(cli, [*s, "commit", "x", str(tmp_path / "ft.safetensors"), "--base", "b", "--allow-nonfinite",
                            "--json"])
    assert r.exit_code == 0, r.stderr
    with Store.open(tmp_path / "store") as store:
        got = dict(store.tensors("x"))
    assert byte_view(got["layers.0.w"]) == byte_view(ft["layers.0.w"])
