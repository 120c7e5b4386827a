"""Encodings: pinned bytes, round trips, error bounds, determinism and refusals."""

from __future__ import annotations

import importlib.util
import json
import sys

import blake3
import numpy as np
import pytest
import torch

from deltastore.codecs import encodings
from deltastore.codecs import quantize as Q
from deltastore.codecs.encodings import Encoded
from deltastore.core.errors import EncodingError

LOSSY = ["int8", "int4", "nf4", "fp4", "1bit", "lowrank:4", "mixedrank:4"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None  # an optional dependency


def get(spec: str, **options: object) -> encodings.Encoding:
    if spec in ("nf4", "fp4") and not HAVE_BNB:
        pytest.skip("bitsandbytes is not installed")
    return encodings.get(spec, **options)


def golden_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A 7x19 base and target built from integers, so every platform makes the same bits.
    133 elements: two groups of 64 and a partial one of 5, an odd count, 16 bytes + 5 bits."""
    rng = np.random.RandomState(20261122)
    base = torch.from_numpy(rng.randint(-1024, 1024, size=(7, 19)).astype(np.float32) / 1024)
    delta = torch.from_numpy(rng.randint(-128, 128, size=(7, 19)).astype(np.float32) / 65536)
    return base, base + delta


def b3(data: bytes | memoryview) -> str:
    return blake3.blake3(bytes(data)).hexdigest()


# Computed once from golden_pair(); a change in any encoding's format must fail here.
GOLDEN = {
    "lossless": (
        {"xor": "d953bb84737bb4a2044a1c7ad1179534414be62bebfd8117d2bf974e025ae173"},
        {"mode": "xor"}),
    "int8": (
        {"codes": "e0040b036ed9e607d7a39cf4a8b590a81a3e86be80d9a716d3f0442567109528",
         "scales": "46b9b9a077d9b4532a77093006e5a49d6265e77be604723429814a44cf0ada3e"},
        {"group_size": 64, "scale_exp": -30}),
    "int4": (
        {"codes": "26d5dac5b54e168c10e8688653138ae84f23ae22a876f8e37d205aac3cb4b0c7",
         "scales": "1adb94510643e27ea43c0cc322465e35d2e70e903eff4787e447540d51ba67ee"},
        {"group_size": 64, "scale_exp": -26}),
    "nf4": (
        {"data": "c3d126865ca591289b9ec622bd7cc1daea73141fe2de3b3b417d5bc3b5bd2daa",
         "absmax": "aa30f5c254ea2c6addc541a61c7b9a85a1d1b3aeb960a3011323edc87744acee",
         "code": "e9661fed12f258dec99cbc51bff56c21489516582b6b7f85996bd68d0d3476dc"},
        {"quant_type": "nf4", "blocksize": 64, "quant_shape": [134], "quant_dtype": "F32"}),
    "fp4": (
        {"data": "5da6297c88936542378f17ed8e1f732c9c98549773e3fceca8b73acb80fdc7a4",
         "absmax": "aa30f5c254ea2c6addc541a61c7b9a85a1d1b3aeb960a3011323edc87744acee",
         "code": "aa56ea433143c480a35ee333e22ef06526c61e2d600401772a02ad29bfac7d44"},
        {"quant_type": "fp4", "blocksize": 64, "quant_shape": [134], "quant_dtype": "F32"}),
    "1bit": (
        {"signs": "cbf92171a834d3e4e37da8f31b2c312f9ff22bb66f959b37dcce113f6e3fc70f",
         "scales": "3b50ebba4a6bacac29a8c9365ae1460bdbd698093f25f78524855ddd68f58df0"},
        {"scale_exp": -24}),
    "lowrank:2": (
        {"us": "cee4c4c169bfa6297a5fe9c924f84eb0df068fc8eab4923229cc27fa88f99f9f",
         "vh": "f1d41a27a0ac19fefe9b3ede79430d36f51df45039593f0ad3627ed29a303a41"},
        {"rank": 2, "dtype": "bf16", "scale_exp": -15}),
    "mixedrank:2": (
        {"u": "d44efb183ae78d5c8697916927035ae553dfee27d715ade3ac668f36073322db",
         "u_scales": "78ab60aa3ef18ff83abea1ddcdd7f6b388abb57c4e557552c11a7d624bd27347",
         "v": "5f69a7c84dab7b7275afacf618f77f29f7e09c619d664e470766a97e8ccf2b85",
         "v_scales": "e215cf0d65e8a23f3e41695f1bbb94f1f053846f56e0fb67d3beb7ebef78a490"},
        {"bits": [4, 4, 4, 4, 4, 2, 1], "group_size": 64, "u_exp": -16, "v_exp": -24}),
}


@pytest.mark.parametrize("spec", sorted(GOLDEN))
def test_golden_parts(spec: str) -> None:
    base, target = golden_pair()
    encoded = get(spec).encode(base, target)
    hashes, params = GOLDEN[spec]
    assert {name: b3(data) for name, data in encoded.parts.items()} == hashes
    assert encoded.params == params


# What apply produces from those parts (float32 bytes): pins the decoding side of each format.
GOLDEN_DECODED = {
    "int8": "6839ecb011774ebea3ea41f6d8f47e84b6c9620bfeb04ee002185386ee6605e5",
    "int4": "8dcdbda50ec2dca60db05d5617e5a9290a718df37cba785a917297c63bb26f55",
    "nf4": "a224cc57e7e99d83af011e56677b1dd18f26925891f7052f99d6f65e4ed01b30",
    "fp4": "42db525af457013a9a3dcb36fdcd02e4e2ba0148745ace35cdac4394de0008f6",
    "1bit": "4e15c7accceccdef561332f2d8a92b890ab6851ac71dee5dcdea85cd51e2d9ac",
    "lowrank:2": "cbef405bca895f8cfd352ec061eea2315c0e585677c33417d6756e14debd891f",
    "mixedrank:2": "3d6b371f841959d8df7f88325d81b249d2168dd8ecb0e1b0fa9c24d5ab89ff49",
}


@pytest.mark.parametrize("spec", sorted(GOLDEN_DECODED))
def test_golden_decoded(spec: str) -> None:
    base, target = golden_pair()
    enc = get(spec)
    out = enc.decode(base, enc.encode(base, target), dtype=torch.float32, shape=(7, 19))
    assert b3(out.numpy().tobytes()) == GOLDEN_DECODED[spec]


def test_golden_lossless_raw() -> None:
    base, target = golden_pair()
    encoded = get("lossless").encode(base.double(), target)
    assert encoded.params == {"mode": "raw"}
    assert b3(encoded.parts["raw"]) == "6d7b8b923d3ca8308675b38acacf86d610b13a31b246d742ffbedad2b05feff6"


def test_int4_nibble_order_and_scale_layout() -> None:
    # Scale 1 (fp16 0x3C00 after a 2**scale_exp shift): dW = codes exactly.
    base = torch.zeros(5)
    target = torch.tensor([7.0, -7.0, 0.0, 3.0, -1.0])
    encoded = get("int4", group_size=8).encode(base, target)
    # q + 8: 15, 1, 8, 11, 7 -> (low, high) pairs (15, 1), (8, 11), (7, pad 8)
    assert bytes(encoded.parts["codes"]) == bytes([0x1F, 0xB8, 0x87])
    exp = encoded.params["scale_exp"]
    scale = np.frombuffer(bytes(encoded.parts["scales"]), dtype="<f2").astype(np.float64) * 2.0 ** exp
    assert scale.tolist() == [1.0]
    assert torch.equal(get("int4").decode(base, encoded, dtype=torch.float32, shape=(5,)), target)


def test_int4_every_code_byte_decodes_to_its_nibbles_across_slices() -> None:
    from deltastore.codecs import quantize

    # All 256 code bytes, twice, then one odd element; scale 1 (fp16 1.0, exponent 0).
    codes = bytes(range(256)) * 2 + bytes([0x8F])
    n = 2 * 512 + 1
    parts = {"codes": codes, "scales": np.ones(-(-n // 8), dtype="<f2").tobytes()}
    params = {"group_size": 8, "scale_exp": 0}
    expected = torch.tensor([v - 8.0 for b in codes for v in (b & 0x0F, b >> 4)][:n])
    for step in (16, 64, n + 16):  # several slices, or one
        # (each slice's buffer is the next one's: kept as a copy)
        sliced = torch.cat([dw.clone() for _, dw in quantize.absmax_decode_slices(parts, params, bits=4, numel=n,
                                                                                  slice_elements=step)])
        assert torch.equal(sliced, expected)


def test_1bit_bit_order() -> None:
    base = torch.zeros(2, 9)
    target = torch.tensor([[1.0, -1, -1, -1, -1, -1, -1, -1, 1], [-2.0, 2, 2, 2, 2, 2, 2, 2, -2]])
    encoded = get("1bit").encode(base, target)
    # 18 bits, least significant first: row 0 = 1,0,0,0,0,0,0,0 | 1, row 1 = 0,1,1,1,1,1,1,1 | 0
    assert bytes(encoded.parts["signs"]) == bytes([0b00000001, 0b11111101, 0b00000001])
    decoded = get("1bit").decode(base, encoded, dtype=torch.float32, shape=(2, 9))
    assert torch.equal(decoded, target)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", ["lossless", *LOSSY])
def test_round_trip_keeps_dtype_shape_and_is_deterministic(spec: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(33, 47, generator=g).to(dtype)  # 1551 elements: no size fills a group
    target = (base.float() + torch.randn(33, 47, generator=g) * 1e-2).to(dtype)
    enc = get(spec)
    encoded = enc.encode(base, target)
    again = enc.encode(base, target)
    assert {k: bytes(v) for k, v in encoded.parts.items()} == {k: bytes(v) for k, v in again.parts.items()}
    json.dumps(encoded.params)
    for data in encoded.parts.values():
        assert isinstance(data, (bytes, memoryview))
    out = enc.decode(base, encoded, dtype=dtype, shape=(33, 47))
    assert out.dtype == dtype and out.shape == (33, 47)
    rebuilt = encodings.from_params(enc.spec, encoded.params)
    twice = rebuilt.decode(base, encoded, dtype=dtype, shape=(33, 47))
    assert out.view(torch.uint8).numpy().tobytes() == twice.view(torch.uint8).numpy().tobytes()
    if enc.exact:
        assert torch.equal(out, target)
    else:
        err = rel_error(base, target, out)
        assert err < {"1bit": 1.0, "lowrank:4": 1.0, "mixedrank:4": 1.0}.get(spec, 0.5)


def rel_error(base: torch.Tensor, target: torch.Tensor, out: torch.Tensor) -> float:
    dw = target.double() - base.double()
    return float((out.double() - target.double()).norm() / dw.norm())


@pytest.mark.parametrize("spec", LOSSY)
@pytest.mark.parametrize("numel", [1, 2, 3, 63, 65, 127, 129])
def test_odd_sizes(spec: str, numel: int) -> None:
    g = torch.Generator().manual_seed(numel)
    ranked = ":" in spec  # lowrank:R, mixedrank:R: a matrix, of rank 1 here
    shape = (1, numel) if ranked else (numel,)
    base = torch.randn(shape, generator=g)
    target = base + torch.randn(shape, generator=g) * 1e-3
    enc = get(spec.split(":")[0] + ":1" if ranked else spec)
    out = enc.decode(base, enc.encode(base, target), dtype=torch.float32, shape=shape)
    assert out.shape == shape
    assert rel_error(base, target, out) < (0.02 if spec == "int8" else 1.0)


@pytest.mark.parametrize(("spec", "bound"), [("int8", 0.01), ("int4", 0.12), ("nf4", 0.12)])
def test_error_bounds_on_random_deltas(spec: str, bound: float) -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(256, 384, generator=g) * 0.02
    target = base + torch.randn(256, 384, generator=g) * 1e-4
    enc = get(spec)
    assert rel_error(base, target, enc.decode(base, enc.encode(base, target), dtype=torch.float32,
                                              shape=(256, 384))) < bound


@pytest.mark.parametrize("spec", LOSSY)
@pytest.mark.parametrize("power", [-100, -23, 100])
def test_tiny_and_huge_deltas_decode_as_well_as_ordinary_ones(spec: str, power: int) -> None:
    # Scales carry a power-of-two exponent: a delta 2**power times another decodes to exactly
    # 2**power times its decoding. fp16 scales alone would flush 2**-23-sized scales to a few
    # subnormal steps and 2**100-sized ones to inf.
    dw = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    zero = torch.zeros(16, 64)
    enc = get(spec)
    ordinary = enc.decode(zero, enc.encode(zero, dw), dtype=torch.float32, shape=(16, 64))
    scaled = enc.decode(zero, enc.encode(zero, dw * 2.0 ** power), dtype=torch.float32, shape=(16, 64))
    assert torch.isfinite(scaled).all()
    assert torch.equal(scaled, ordinary * 2.0 ** power)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("spec", ["lossless", *LOSSY])
def test_zero_delta_applies_as_the_base(spec: str, dtype: torch.dtype) -> None:
    base = torch.randn(8, 70, generator=torch.Generator().manual_seed(4)).to(dtype)
    enc = get(spec)
    assert torch.equal(enc.decode(base, enc.encode(base, base.clone()), dtype=dtype, shape=(8, 70)), base)


def test_int8_group_of_zeros_decodes_to_zero() -> None:
    base = torch.zeros(130)
    target = torch.zeros(130)
    target[64:] = torch.linspace(-1, 1, 66)
    enc = get("int8")
    out = enc.decode(base, enc.encode(base, target), dtype=torch.float32, shape=(130,))
    assert torch.equal(out[:64], torch.zeros(64))


@pytest.mark.parametrize(("shape", "rank"), [((48, 20), 3), ((20, 48), 3), ((64, 64), 64)])
def test_lowrank_is_exact_on_a_delta_of_its_rank(shape: tuple[int, int], rank: int) -> None:
    # On a zero base, so that target - base is the rank-R delta itself, not a rounding of it.
    g = torch.Generator().manual_seed(5)
    base = torch.zeros(shape)
    dw = (torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)) * 1e-3
    enc = get(f"lowrank:{rank}", dtype="fp32")
    out = enc.decode(base, enc.encode(base, dw), dtype=torch.float32, shape=shape)
    assert rel_error(base, dw, out) < 1e-5


def test_lowrank_is_the_best_rank_r_approximation() -> None:
    g = torch.Generator().manual_seed(6)
    dw = torch.randn(60, 40, generator=g) * torch.logspace(0, -2, 40)  # a decaying spectrum
    enc = get("lowrank:5", dtype="fp32")
    out = enc.decode(torch.zeros(60, 40), enc.encode(torch.zeros(60, 40), dw), dtype=torch.float32,
                     shape=(60, 40))
    s = torch.linalg.svdvals(dw.double())
    best = float(s[5:].square().sum().sqrt() / s.square().sum().sqrt())
    assert rel_error(torch.zeros(60, 40), dw, out) < best * 1.0001


def test_nf4_bitsandbytes_decode_matches_its_recorded_code_table() -> None:
    # A table other than bitsandbytes' own is decoded from the recorded one, the same way.
    g = torch.Generator().manual_seed(7)
    base = torch.zeros(9, 31)
    target = torch.randn(9, 31, generator=g)
    enc = get("nf4")
    encoded = enc.encode(base, target)
    code = np.frombuffer(bytes(encoded.parts["code"]), dtype="<f4")
    halved = Encoded({**encoded.parts, "code": memoryview((code / 2).astype("<f4"))}, encoded.params)
    out = enc.decode(base, encoded, dtype=torch.float32, shape=(9, 31))
    half = enc.decode(base, halved, dtype=torch.float32, shape=(9, 31))
    assert torch.equal(half * 2, out)


def test_from_params_round_trips_every_option() -> None:
    base, target = golden_pair()
    for spec, options in [("int8", {"group_size": 16}), ("int4", {"group_size": 5}),
                          ("nf4", {"blocksize": 128}), ("fp4", {"blocksize": 32}), ("1bit", {}),
                          ("lowrank:3", {"dtype": "fp16"}), ("lossless", {})]:
        enc = get(spec, **options)
        assert encodings.from_params(enc.spec, enc.encode(base, target).params) == enc if spec != "lossless" \
            else isinstance(encodings.from_params(spec, {"mode": "xor"}), encodings.Lossless)


def test_options_of_other_encodings_are_ignored() -> None:
    assert encodings.get("int4", group_size=32, blocksize=128, dtype=None) == encodings.Int4(32)
    assert isinstance(encodings.get("lossless", group_size=32), encodings.Lossless)
    assert encodings.get("lowrank:8").spec == "lowrank:8"


@pytest.mark.parametrize(("spec", "options", "allowed"), [
    ("int3", {}, "known: 1bit, fp4, int4, int8, lossless, lowrank"),
    ("int4", {"group_size": 0}, "positive whole number"),
    ("int8", {"group_size": -3}, "positive whole number"),
    ("int8", {"group_size": 2.5}, "positive whole number"),
    ("nf4", {"blocksize": 100}, "one of 32, 64, 128"),
    ("lowrank", {}, "lowrank:R"),
    ("lowrank:0", {}, "positive whole rank"),
    ("lowrank:x", {}, "positive whole rank"),
    ("lowrank:8", {"dtype": "int8"}, "bf16, fp16, fp32"),
    ("int4:2", {}, "takes no argument"),
    ("int4", {"groupsize": 32}, "known options: blocksize (fp4)"),
])
def test_bad_specs_are_refused_saying_what_is_allowed(spec: str, options: dict, allowed: str) -> None:
    with pytest.raises(EncodingError, match=allowed.replace("(", r"\(").replace(")", r"\)")):
        encodings.get(spec, **options)


def test_a_rank_larger_than_the_matrix_names_the_largest() -> None:
    with pytest.raises(EncodingError, match=r"at most 12 \(lowrank:12\)"):
        get("lowrank:13").encode(torch.zeros(12, 40), torch.ones(12, 40))


@pytest.mark.parametrize(("spec", "base", "target", "what"), [
    ("lowrank:1", torch.zeros(5), torch.ones(5), "2-D"),
    ("int4", torch.zeros(4, 4), torch.ones(16), "one shape"),
    ("int8", torch.zeros(4), torch.tensor([0.0, float("inf"), 0, 0]), "inf or nan"),
    ("int8", torch.zeros(4, dtype=torch.int32), torch.ones(4, dtype=torch.int32), "floating-point"),
])
def test_tensors_a_lossy_encoding_cannot_hold_are_refused(spec: str, base: torch.Tensor,
                                                         target: torch.Tensor, what: str) -> None:
    with pytest.raises(EncodingError, match=what):
        get(spec).encode(base, target)


@pytest.mark.parametrize("spec", LOSSY)
def test_damaged_parts_and_params_are_refused_before_decoding(spec: str) -> None:
    base, target = golden_pair()
    enc = get(spec)
    good = enc.encode(base, target)
    first = sorted(good.parts)[0]
    short = Encoded({**good.parts, first: bytes(good.parts[first])[:-1]}, good.params)
    missing = Encoded({k: v for k, v in good.parts.items() if k != first}, good.params)
    for bad in (short, missing):
        with pytest.raises(EncodingError, match=first):
            enc.decode(base, bad, dtype=torch.float32, shape=(7, 19))
    key = next(k for k in ("scale_exp", "blocksize", "u_exp") if k in good.params)
    with pytest.raises(EncodingError, match=key):
        enc.decode(base, Encoded(good.parts, {**good.params, key: "9"}), dtype=torch.float32, shape=(7, 19))
    with pytest.raises(EncodingError, match="shape"):
        enc.decode(base, good, dtype=torch.float32, shape=(19, 7))


def test_nf4_without_bitsandbytes_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(EncodingError, match="pip install bitsandbytes"):
        encodings.get("nf4").encode(torch.zeros(4, 4), torch.ones(4, 4))


def test_lowrank_from_a_shared_basis_is_the_same_bytes():
    # compare and `commit --encoding auto` find each matrix's singular vectors once for every
    # rank; what they store and measure must be what lowrank:R alone gives.
    from deltastore.codecs.quantize import gram_basis

    g = torch.Generator().manual_seed(7)
    for shape in ((96, 40), (40, 96)):
        base = torch.randn(shape, generator=g).to(torch.bfloat16)
        target = (base.float() + 1e-2 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        basis = gram_basis(target.float() - base.float(), keep=32)
        for rank in (1, 8, 32):
            enc = encodings.get(f"lowrank:{rank}")
            alone, shared = enc.encode(base, target), enc.encode(base, target, basis=basis)
            assert alone.params == shared.params
            assert {k: bytes(v) for k, v in alone.parts.items()} == {k: bytes(v) for k, v in shared.parts.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_all_finite_finds_one_nan_or_inf_anywhere(dtype: torch.dtype) -> None:
    n = 3 * Q.SLICE + 5  # more than one slice of an encode, and an odd tail
    assert Q.all_finite(torch.randn(n).to(dtype))
    assert Q.all_finite(torch.empty(0, dtype=dtype))
    for value in (float("nan"), float("inf"), float("-inf")):
        for at in (0, Q.SLICE + 1, n - 1):
            t = torch.randn(n).to(dtype)
            t[at] = value
            if torch.isfinite(t.float()).all():  # float8 e4m3 has no inf: it becomes nan or saturates
                continue
            assert not Q.all_finite(t), (value, at)


@pytest.mark.parametrize("spec", ["int8", "int4", "nf4", "1bit", "lowrank:2"])
def test_a_nan_late_in_a_large_delta_is_refused(spec: str) -> None:
    base = torch.zeros(64, 3 * Q.SLICE // 64 + 3)
    target = torch.full_like(base, 1e-3)
    target[-1, -2] = float("nan")
    with pytest.raises(EncodingError, match="inf or nan"):
        get(spec).encode(base, target)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_4bit_encode_is_byte_for_byte_bitsandbytes_quantize_4bit(quant_type: str, blocksize: int) -> None:
    if not HAVE_BNB:
        pytest.skip("bitsandbytes is not installed")
    bnb = Q._bnb()
    g = torch.Generator().manual_seed(7)
    # Several slices and a short last block; zeros, an all-zero block, and values on the
    # midpoints between codes (where the rounding direction is decided).
    for n in (2, 64, 3 * Q.SLICE + 2 * 19, 5 * blocksize + 6):
        flat = torch.randn(n, generator=g) * 1e-3
        flat[::7] = 0
        flat[:blocksize] = 0
        code = bnb.get_4bit_type(quant_type, device="cpu").float()
        mids = (code.sort().values[1:] + code.sort().values[:-1]) / 2
        if n >= 2 * blocksize:
            flat[blocksize:blocksize + 15] = mids * flat[blocksize:2 * blocksize].abs().max()
        packed, state = bnb.quantize_4bit(flat, blocksize=blocksize, quant_type=quant_type,
                                          compress_statistics=False, quant_storage=torch.uint8)
        parts, _ = Q.bnb_encode(flat, quant_type=quant_type, blocksize=blocksize)
        assert bytes(parts["data"]) == packed.numpy().tobytes(), n
        assert bytes(parts["absmax"]) == state.absmax.float().numpy().tobytes(), n


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_codes_are_bucketize_among_the_midpoints_for_floats_across_minus_1_to_1(quant_type: str) -> None:
    if not HAVE_BNB:
        pytest.skip("bitsandbytes is not installed")
    code = Q._bnb().get_4bit_type(quant_type, device="cpu").float()
    nearest = Q._NearestCode(code)
    assert nearest.grid
    order = torch.argsort(code)
    mids = (code[order[:-1]] + code[order[1:]]) / 2
    ones = torch.tensor(1.0)
    edges = torch.cat([mids, mids.nextafter(ones), mids.nextafter(-ones),
                       torch.tensor([-1.0, 1.0, 0.0, -0.0, 1e-45, -1e-45])])
    positive = torch.arange(0, 0x3F800001, 997, dtype=torch.int64).to(torch.int32).view(torch.float32)
    for values in (edges, positive, -positive):
        expected = order[torch.bucketize(values, mids)].to(torch.uint8).numpy()
        assert np.array_equal(nearest(values), expected)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32, torch.float64])
def test_lossless_decoded_in_place_equals_decoded_and_keeps_the_base(dtype) -> None:
    from deltastore.codecs.xorbytes import byte_ungroup, xor_ungroup_in_place

    gen = torch.Generator().manual_seed(9)
    base = torch.randint(0, 255, (1001 * 8,), generator=gen, dtype=torch.uint8).view(dtype)
    target = torch.randint(0, 255, (1001 * 8,), generator=gen, dtype=torch.uint8).view(dtype)
    payload = get("lossless").encode(base, target).parts["xor"]
    expected = byte_ungroup(payload, base.element_size(), xor=base.view(torch.uint8).numpy()).numpy()
    module, keep = base.clone(), torch.empty_like(base)
    xor_ungroup_in_place(payload, base.element_size(), module.view(torch.uint8).numpy(),
                         keep.view(torch.uint8).numpy(), chunk=100)  # many chunks and a short last one
    assert module.view(torch.uint8).numpy().tobytes() == expected.tobytes() == target.view(torch.uint8).numpy().tobytes()
    assert torch.equal(keep.view(torch.uint8), base.view(torch.uint8))
    with pytest.raises(EncodingError):
        xor_ungroup_in_place(payload, base.element_size(), module.view(torch.uint8).numpy()[1:],
                             keep.view(torch.uint8).numpy()[1:])


def spectral_delta(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A delta whose singular values fall off as a fine-tune's do, over a floor of noise."""
    g = torch.Generator().manual_seed(seed)
    q1 = torch.linalg.qr(torch.randn(rows, rows, generator=g)).Q
    q2 = torch.linalg.qr(torch.randn(cols, cols, generator=g)).Q
    k = min(rows, cols)
    s = 1.0 / torch.arange(1, k + 1).float() ** 0.7
    return (q1[:, :k] * s) @ q2[:, :k].T * 1e-3


def read_mixedrank(parts: dict, params: dict, rows: int, cols: int) -> np.ndarray:
    """FORMAT.md's mixedrank as an independent reader writes it from the text: bit by bit."""
    def side(name: str, length: int, exp: int) -> np.ndarray:
        data, scales = bytes(parts[name]), np.frombuffer(bytes(parts[name + "_scales"]), "<f2")
        groups = -(-length // params["group_size"])
        out, t = np.zeros((len(params["bits"]), length)), 0
        for i, b in enumerate(params["bits"]):
            for j in range(length):
                k = sum(((data[(t + x) // 8] >> ((t + x) % 8)) & 1) << x for x in range(b))
                t += b
                step = float(scales[i * groups + j // params["group_size"]]) * 2.0 ** exp
                out[i, j] = (k + 0.5 - 2 ** (b - 1)) * step
        return out
    u, v = side("u", rows, params["u_exp"]), side("v", cols, params["v_exp"])
    return (u.T @ v).astype(np.float32)


def test_mixedrank_layout_as_an_independent_reader_decodes_it() -> None:
    dw = spectral_delta(40, 30, seed=5)
    zero = torch.zeros(40, 30)
    enc = get("mixedrank:3", group_size=16)
    encoded = enc.encode(zero, dw)
    assert len(set(encoded.params["bits"])) > 1  # widths mixed, as the layout must handle
    ours = enc.decode(zero, encoded, dtype=torch.float32, shape=(40, 30)).numpy()
    theirs = read_mixedrank(encoded.parts, encoded.params, 40, 30)
    assert np.abs(ours - theirs).max() <= 1e-6 * np.abs(theirs).max()


@pytest.mark.parametrize(("shape", "rank"), [((256, 96), 8), ((96, 256), 8), ((512, 512), 16)])
def test_mixedrank_keeps_more_than_lowrank_in_its_bytes(shape: tuple[int, int], rank: int) -> None:
    dw = spectral_delta(*shape, seed=6)
    zero = torch.zeros(shape)
    errors, sizes = {}, {}
    for spec in (f"lowrank:{rank}", f"mixedrank:{rank}"):
        enc = get(spec)
        encoded = enc.encode(zero, dw)
        sizes[spec] = sum(len(p) for p in encoded.parts.values())
        errors[spec] = rel_error(zero, dw, enc.decode(zero, encoded, dtype=torch.float32, shape=shape))
    assert sizes[f"mixedrank:{rank}"] <= sizes[f"lowrank:{rank}"]
    assert errors[f"mixedrank:{rank}"] < 0.8 * errors[f"lowrank:{rank}"], errors
