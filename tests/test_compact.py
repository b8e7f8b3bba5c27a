"""Tests of token compaction: ``adsc_ext.compact_tokens`` and the ops under it
(``torch.ops.adsc.compact_tokens``, ``compact_tokens_out``, ``scatter_add_tokens``).

The oracle is :func:`adsc_ext.reference.compact_tokens_reference`; compaction is a pure copy, so
every comparison with it is bit for bit (NaN payloads and -0.0 included) unless a tolerance is
written beside the test (only sums of duplicated gradients are rounded).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adsc_ext
import adsc_ext.ops  # noqa: F401  (registers torch.ops.adsc.* and their fake/autograd kernels)
from adsc_ext.reference import compact_tokens_reference
from conftest import DEVICES

compact_tokens = adsc_ext.compact_tokens
ops = torch.ops.adsc

DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.bool, torch.uint8,
]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INDEX_DTYPES = [torch.int32, torch.int64]


# ---- helpers -------------------------------------------------------------------------------------
def make_x(shape, dtype, device="cpu", seed=0):
    """A tensor whose every element is distinct-ish and whose floats include the awkward values.

    Floats are random bit patterns (so NaNs with payloads, infinities, subnormals and -0.0 all
    occur), bools are 0/1 bytes, integers are random over their range. Deterministic per seed.
    """
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    if dtype == torch.bool:
        t = torch.randint(0, 2, shape, generator=g, dtype=torch.uint8).bool()
    elif dtype.is_floating_point:
        nbytes = torch.empty((), dtype=dtype).element_size()
        n = 1
        for s in shape:
            n *= s
        raw = torch.randint(0, 256, (n * nbytes,), generator=g, dtype=torch.uint8)
        t = raw.view(dtype).reshape(shape)
        flat = t.view(-1)
        specials = [0.0, -0.0, float("nan"), float("inf"), -float("inf")]
        for i, v in enumerate(specials[: flat.numel()]):
            flat[i] = v
        if flat.numel() > len(specials):  # a NaN with a payload and the sign bit set
            bits = flat[len(specials):len(specials) + 1].view(torch.uint8)
            bits.fill_(0xFF)
    elif dtype == torch.uint8:
        t = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)
    return t.to(device)


def bits(t):
    """Byte view of a tensor, so equality counts NaN payloads and the sign of zero."""
    t = t.contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(torch.uint8)


def assert_bits_equal(actual, expected):
    assert isinstance(actual, torch.Tensor)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.device == expected.device, (actual.device, expected.device)
    a, e = bits(actual).cpu(), bits(expected).cpu()
    if not torch.equal(a, e):
        diff = (a != e)
        rows = diff.reshape(actual.shape[0], -1).any(dim=1).nonzero().flatten().tolist() \
            if actual.dim() > 0 and actual.shape[0] > 0 else []
        raise AssertionError(f"results differ (bit level) in rows {rows[:20]}")


def ref_on_contiguous(x, index):
    return compact_tokens_reference(x.contiguous(), index.contiguous())


def idx(values, dtype=torch.int64, device="cpu"):
    return torch.tensor(values, dtype=dtype, device=device)


# ---- 1. bit-exact equality with the reference ---------------------------------------------------
# (name, x shape, index values): the index is flat over the leading index.dim() dims of x.
CASES_1D = [
    ("row1_no_feature_dim", (9,), [0, 8, 3, -1, 3, 1]),
    ("row_elems_1", (9, 1), [8, 0, -1, 2, 2, 7, 5]),
    ("row_elems_3", (7, 3), [6, 5, 4, 3, 2, 1, 0, -1]),
    ("row_elems_5", (6, 5), [1, 1, 1, -1, -1, 5]),
    ("row_elems_7", (11, 7), [10, 0, 9, 1, 8, -1, 2]),
    ("features_3x5", (5, 3, 5), [4, -1, 0, 2, 2]),
    ("features_2x1x3", (4, 2, 1, 3), [3, 0, -1]),
    ("T_is_1", (1, 6), [0, -1, 0]),
    ("all_minus_one", (4, 8), [-1, -1, -1]),
    ("all_duplicates", (5, 4), [2, 2, 2, 2, 2, 2]),
    ("identity", (8, 16), list(range(8))),
    ("wide_row", (5, 257), [4, 3, -1, 0]),
    ("empty_index", (5, 3), []),
    ("empty_x", (0, 3), [-1, -1]),
    ("empty_x_empty_index", (0, 4), []),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,shape,values", CASES_1D, ids=[c[0] for c in CASES_1D])
def test_matches_reference_bitwise(name, shape, values, dtype, index_dtype, device):
    x = make_x(shape, dtype, device, seed=len(values))
    index = idx(values, index_dtype, device)
    expected = compact_tokens_reference(x, index)
    assert expected.shape == (len(values), *shape[1:])
    assert_bits_equal(compact_tokens(x, index), expected)
    # the raw op and check_index=False give the same bits
    assert_bits_equal(ops.compact_tokens(x, index, True), expected)
    assert_bits_equal(compact_tokens(x, index, check_index=False), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_minus_one_rows_are_zero_and_rows_are_copied(dtype, device):
    # Independent of the reference: a -1 row is all-zero bytes (+0.0, not -0.0), and every other
    # row is byte-identical to x's row.
    x = make_x((6, 5), dtype, device, seed=3)
    values = [5, -1, 0, 0, -1, 3]
    out = compact_tokens(x, idx(values, device=device))
    ob, xb = bits(out).cpu(), bits(x).cpu()
    for i, j in enumerate(values):
        if j == -1:
            assert not ob[i].any(), f"row {i} should be zero bytes"
        else:
            assert torch.equal(ob[i], xb[j]), f"row {i} should be x[{j}]"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feat", [(), (1,), (3,), (7,), (2, 3)], ids=lambda f: f"feat{list(f)}")
def test_padded_layout(feat, dtype, index_dtype, device):
    # x [B, S, ...] with a [B, S'] index whose values are flat rows of B*S, -1 for padding.
    B, S = 3, 5
    x = make_x((B, S, *feat), dtype, device, seed=B * S + len(feat))
    values = [
        [-1, -1, 1, 3, 4],  # left padding
        [5, 5, 9, -1, -1],  # right padding, duplicate
        [14, 0, 7, 10, 12],  # rows of other sequences are allowed: the index is flat
    ]
    values = [row[:4] for row in values]  # S' = 4 < S
    index = idx(values, index_dtype, device)
    expected = compact_tokens_reference(x, index)
    out = compact_tokens(x, index)
    assert out.shape == (B, 4, *feat)
    assert_bits_equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_only_tensors(dtype, index_dtype, device):
    # 1-D x [T] with index [T'], and 2-D x [B, S] (e.g. position ids) with index [B, S'].
    x1 = make_x((10,), dtype, device, seed=1)
    i1 = idx([9, -1, 0, 4, 4], index_dtype, device)
    out1 = compact_tokens(x1, i1)
    assert out1.shape == (5,)
    assert_bits_equal(out1, compact_tokens_reference(x1, i1))

    x2 = make_x((2, 6), dtype, device, seed=2)
    i2 = idx([[-1, 1, 3, 5], [6, 8, 11, -1]], index_dtype, device)
    out2 = compact_tokens(x2, i2)
    assert out2.shape == (2, 4)
    assert_bits_equal(out2, compact_tokens_reference(x2, i2))


@pytest.mark.parametrize("device", DEVICES)
def test_position_ids_example(device):
    # The typical use: int64 position ids [B, S] compacted by a plan-style [B, S'] index.
    pos = torch.arange(12, device=device).reshape(2, 6) % 6
    index = idx([[1, 3, 5], [6, 7, -1]], torch.int32, device)
    out = compact_tokens(pos, index)
    assert out.tolist() == [[1, 3, 5], [0, 1, 0]]


@pytest.mark.parametrize("device", DEVICES)
def test_result_is_fresh_and_contiguous(device):
    # Without out= the result is a new contiguous tensor, never a view of x (even for an
    # identity index), and x is left as it was.
    x = make_x((5, 3), torch.float32, device, seed=5)
    before = bits(x).clone()
    for xx in (x, x.t().contiguous().t()):
        out = compact_tokens(xx, idx(list(range(5)), device=device))
        assert out.is_contiguous()
        assert out.data_ptr() != xx.data_ptr()
        assert_bits_equal(out, x)
        out.zero_()
    assert torch.equal(bits(x), before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_zero_width_rows(dtype, device):
    # Rows of 0 elements. compact_tokens_reference cannot take them (x.reshape(-1, 0) is
    # ambiguous), so the expectation is written out: the shape, and nothing else to compare.
    x = make_x((4, 0), dtype, device)
    out = compact_tokens(x, idx([3, -1, 0], device=device))
    assert out.shape == (3, 0) and out.dtype == dtype and out.device == x.device
    x3 = make_x((4, 0, 3), dtype, device)
    assert compact_tokens(x3, idx([3, -1], device=device)).shape == (2, 0, 3)
    with pytest.raises(IndexError):
        compact_tokens(x, idx([4], device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_width_rows_padded(device):
    x = make_x((2, 3, 0), torch.float32, device)
    out = compact_tokens(x, idx([[0, -1], [5, 3]], device=device))
    assert out.shape == (2, 2, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_large_case(dtype, device):
    # Many rows and a row size that is a multiple of 16 bytes (the vectorised path on CUDA).
    g = torch.Generator().manual_seed(7)
    x = make_x((700, 64), dtype, device, seed=7)
    index = torch.randint(-1, 700, (1500,), generator=g).to(device)
    assert_bits_equal(compact_tokens(x, index), compact_tokens_reference(x, index))


# ---- 2. non-contiguous inputs ---------------------------------------------------------------------
def _non_contiguous_x(kind, dtype, device):
    """(x, description) of a non-contiguous [T, D] (or offset) tensor, T = 7, D = 5."""
    T, D = 7, 5
    if kind == "every_other_column":
        x = make_x((T, 2 * D), dtype, device, seed=11)[:, ::2]
    elif kind == "transposed":
        x = make_x((D, T), dtype, device, seed=12).t()
    elif kind == "row_offset":
        x = make_x((T + 1, D), dtype, device, seed=13)[1:]
    elif kind == "element_offset":  # base pointer off by one element: not 16-byte aligned
        x = make_x((T * D + 1,), dtype, device, seed=14)[1:].view(T, D)
    elif kind == "row_strided_slice":
        x = make_x((T, D + 3), dtype, device, seed=15)[:, :D]
    elif kind == "every_other_row":
        x = make_x((2 * T, D), dtype, device, seed=16)[::2]
    elif kind == "row_strided_3d":
        x = make_x((T, 3, 4), dtype, device, seed=17)[:, 1:, :]
    elif kind == "feature_size_1_odd_stride":
        x = make_x((T, 3), dtype, device, seed=18)[:, 1:2]
    else:
        raise AssertionError(kind)
    return x


NON_CONTIGUOUS = [
    "every_other_column", "transposed", "row_offset", "element_offset", "row_strided_slice",
    "every_other_row", "row_strided_3d", "feature_size_1_odd_stride",
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", NON_CONTIGUOUS)
def test_non_contiguous_x(kind, dtype, device):
    x = _non_contiguous_x(kind, dtype, device)
    if kind == "element_offset" and x.element_size() < 16:
        assert x.data_ptr() % 16 != 0
    before = bits(x).clone()
    index = idx([6, -1, 0, 3, 3, 5], torch.int64, device)
    expected = ref_on_contiguous(x, index)
    assert_bits_equal(compact_tokens(x, index), expected)
    assert_bits_equal(ops.compact_tokens(x, index, True), expected)
    assert torch.equal(bits(x), before), "x must not be modified"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.bool])
def test_non_contiguous_index(dtype, index_dtype, device):
    x = make_x((9, 3), dtype, device, seed=21)
    full = idx([8, 100, -1, 100, 0, 100, 4, 100, 4], index_dtype, device)  # 100: never read
    index = full[::2]
    assert not index.is_contiguous()
    expected = ref_on_contiguous(x, index)
    assert_bits_equal(compact_tokens(x, index), expected)
    # a non-contiguous 2-D index in the padded layout
    xb = make_x((2, 4, 3), dtype, device, seed=22)
    index2 = idx([[1, 5], [-1, 7], [2, 2]], index_dtype, device).t()
    assert not index2.is_contiguous()
    assert_bits_equal(compact_tokens(xb, index2), ref_on_contiguous(xb, index2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
def test_non_contiguous_padded_x(dtype, device):
    xb = make_x((5, 2, 3), dtype, device, seed=23).transpose(0, 1)  # [B=2, S=5, D=3]
    assert not xb.is_contiguous()
    index = idx([[0, 4, -1], [5, 9, 9]], torch.int64, device)
    assert_bits_equal(compact_tokens(xb, index), ref_on_contiguous(xb, index))


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_x(device):
    x = torch.arange(4.0, device=device).expand(5, 4)  # every row the same memory
    index = idx([0, 3, -1], device=device)
    assert_bits_equal(compact_tokens(x, index), ref_on_contiguous(x, index))


# ---- 3. out= ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_is_written_and_returned(dtype, index_dtype, device):
    x = make_x((6, 5), dtype, device, seed=31)
    index = idx([5, -1, 0, 2, 2], index_dtype, device)
    out = make_x((5, 5), dtype, device, seed=32)  # garbage, incl. NaNs: -1 rows must be zeroed
    ptr = out.data_ptr()
    result = compact_tokens(x, index, out=out)
    assert result is out
    assert result.data_ptr() == ptr
    assert_bits_equal(out, compact_tokens_reference(x, index))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.bool])
def test_out_padded_layout(dtype, device):
    x = make_x((2, 5, 3), dtype, device, seed=33)
    index = idx([[-1, 0, 4], [5, 5, 9]], torch.int32, device)
    out = torch.empty((2, 3, 3), dtype=dtype, device=device)
    ptr = out.data_ptr()
    result = compact_tokens(x, index, out=out)
    assert result is out and out.data_ptr() == ptr
    assert_bits_equal(out, compact_tokens_reference(x, index))


@pytest.mark.parametrize("device", DEVICES)
def test_out_raw_op(device):
    x = make_x((6, 4), torch.float32, device, seed=34)
    index = idx([1, -1, 5], device=device)
    out = torch.full((3, 4), 7.0, device=device)
    ptr = out.data_ptr()
    assert ops.compact_tokens_out(x, index, out, True) is None
    assert out.data_ptr() == ptr
    assert_bits_equal(out, compact_tokens_reference(x, index))


@pytest.mark.parametrize("device", DEVICES)
def test_out_row_strided_is_accepted(device):
    # By design (ops.cpp row_layout) out only needs contiguous rows: a row stride is fine, and
    # the bytes between rows are left alone.
    x = make_x((6, 4), torch.float32, device, seed=35)
    index = idx([5, -1, 1], device=device)
    big = torch.full((6, 4), 3.0, device=device)
    out = big[::2]
    result = compact_tokens(x, index, out=out)
    assert result is out
    assert_bits_equal(out, compact_tokens_reference(x, index))
    assert torch.equal(big[1::2], torch.full((3, 4), 3.0, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_out_empty(device):
    x = make_x((0, 3), torch.float16, device, seed=36)
    out = torch.empty((0, 3), dtype=torch.float16, device=device)
    assert compact_tokens(x, idx([], device=device), out=out) is out
    out2 = torch.full((2, 3), 1.0, dtype=torch.float16, device=device)
    compact_tokens(x, idx([-1, -1], device=device), out=out2)
    assert_bits_equal(out2, torch.zeros((2, 3), dtype=torch.float16, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_out_wrong_shape(device):
    x = make_x((6, 4), torch.float32, device)
    index = idx([0, 1, 2], device=device)
    with pytest.raises(ValueError, match=r"out must have shape \(3, 4\).*got \(2, 4\)"):
        compact_tokens(x, index, out=torch.empty((2, 4), device=device))
    with pytest.raises(ValueError, match=r"out must have shape \(3, 4\).*got \(3, 5\)"):
        compact_tokens(x, index, out=torch.empty((3, 5), device=device))
    with pytest.raises(ValueError, match=r"out must have shape \(3, 4\).*got \(12,\)"):
        compact_tokens(x, index, out=torch.empty((12,), device=device))
    xb = make_x((2, 5, 4), torch.float32, device)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 3, 4\).*got \(6, 4\)"):
        compact_tokens(xb, idx([[0, 1, 2]] * 2, device=device), out=torch.empty((6, 4), device=device))
    # the raw op checks too
    with pytest.raises(ValueError, match=r"out must have shape \[3, 4\].*got \[4, 4\]"):
        ops.compact_tokens_out(x, index, torch.empty((4, 4), device=device), True)


@pytest.mark.parametrize("device", DEVICES)
def test_out_wrong_dtype(device):
    x = make_x((6, 4), torch.float32, device)
    index = idx([0, 1, 2], device=device)
    with pytest.raises(TypeError, match=r"out must have x's dtype Float, got Double"):
        compact_tokens(x, index, out=torch.empty((3, 4), dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match=r"out must have x's dtype Float, got BFloat16"):
        ops.compact_tokens_out(x, index, torch.empty((3, 4), dtype=torch.bfloat16, device=device), True)
    xi = make_x((6, 4), torch.int32, device)
    with pytest.raises(TypeError, match=r"out must have x's dtype Int, got Long"):
        compact_tokens(xi, index, out=torch.empty((3, 4), dtype=torch.int64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_out_not_contiguous_in_features(device):
    x = make_x((6, 4), torch.float32, device)
    index = idx([0, 1, 2], device=device)
    out = torch.empty((4, 3), device=device).t()  # [3, 4], feature stride 3
    with pytest.raises(ValueError, match=r"out must be contiguous in its dims after the first, "
                                         r"got strides \[1, 3\]"):
        compact_tokens(x, index, out=out)
    out3 = torch.empty((3, 5, 4), device=device)[:, ::2]  # [3, 3, 4]: dim 1 strided
    x3 = make_x((6, 3, 4), torch.float32, device)
    with pytest.raises(ValueError, match=r"out must be contiguous in its dims after the first"):
        compact_tokens(x3, index, out=out3)


@pytest.mark.parametrize("device", DEVICES)
def test_out_not_contiguous_padded(device):
    x = make_x((2, 5, 4), torch.float32, device)
    index = idx([[0, 1, 2], [5, 6, -1]], device=device)
    out = torch.empty((2, 4, 3), device=device).transpose(1, 2)  # [2, 3, 4]
    with pytest.raises(ValueError, match=r"out must be contiguous"):
        compact_tokens(x, index, out=out)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_out_wrong_device_cuda():
    x = make_x((6, 4), torch.float32, "cuda")
    index = idx([0, 1, 2], device="cuda")
    with pytest.raises(ValueError, match=r"out must be on cuda.*got cpu"):
        compact_tokens(x, index, out=torch.empty((3, 4)))
    xc = make_x((6, 4), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"must be on cpu.*got cuda"):
        compact_tokens(xc, idx([0, 1, 2]), out=torch.empty((3, 4), device="cuda"))


def test_out_wrong_device_meta():
    x = make_x((6, 4), torch.float32)
    out = torch.empty((3, 4), device="meta")
    with pytest.raises(ValueError, match=r"out must be on cpu"):
        compact_tokens(x, idx([0, 1, 2]), out=out)


@pytest.mark.parametrize("device", DEVICES)
def test_out_overlapping_x(device):
    big = make_x((10, 4), torch.float32, device)
    x = big[:6]
    with pytest.raises(RuntimeError, match=r"single memory location"):  # partial overlap
        compact_tokens(x, idx([0, 1, 2], device=device), out=big[4:7])
    with pytest.raises(RuntimeError, match=r"single memory location"):  # out is x
        compact_tokens(x, idx([5, 4, 3, 2, 1, 0], device=device), out=x)
    # adjacent but disjoint memory is fine
    expected = compact_tokens_reference(x, idx([0, 1, 2], device=device))
    compact_tokens(x, idx([0, 1, 2], device=device), out=big[6:9])
    assert_bits_equal(big[6:9], expected)


# ---- 4. errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("bad", ["N", -2, "big"])
def test_index_out_of_range(bad, index_dtype, device):
    N = 6
    bad = {"N": N, "big": 2**31 - 1}.get(bad, bad)
    x = make_x((N, 4), torch.float32, device)
    index = idx([0, -1, bad, 1], index_dtype, device)
    with pytest.raises(IndexError) as info:
        compact_tokens(x, index)
    msg = str(info.value)
    assert str(bad) in msg, msg  # names the bad value
    assert "-1" in msg and str(N) in msg, msg  # and the valid range
    assert "0 <= index < 6" in msg or "[0, 6)" in msg, msg

    out = torch.full((4, 4), 42.0, device=device)
    with pytest.raises(IndexError, match=str(bad)):
        compact_tokens(x, index, out=out)
    # nothing was written (the CPU path checks every index first; CUDA checks before launching)
    assert torch.equal(out, torch.full((4, 4), 42.0, device=device))

    xb = make_x((2, 3, 4), torch.float32, device)  # padded layout: valid rows are [0, 6)
    with pytest.raises(IndexError, match=str(bad)):
        compact_tokens(xb, idx([[0, 1], [bad, 2]], index_dtype, device))


@pytest.mark.parametrize("bad", [6, -2])
def test_index_out_of_range_cpu_checks_even_without_check_index(bad):
    # compact.h: "the CPU path reports it before writing anything" (check_index only skips the
    # extra GPU synchronisation).
    x = make_x((6, 4), torch.float32)
    out = torch.full((3, 4), 42.0)
    with pytest.raises(IndexError, match=rf"index\[2\] = {bad} is out of range: expected -1 "
                                         r"\(padding\) or 0 <= index < 6"):
        compact_tokens(x, idx([0, 1, bad]), out=out, check_index=False)
    assert torch.equal(out, torch.full((3, 4), 42.0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_index_out_of_range_cuda_unchecked_writes_zero_row():
    # compact.h: without the check the CUDA path never reads out of bounds; it writes a zero row.
    x = make_x((6, 4), torch.float32, "cuda")
    out = compact_tokens(x, idx([1, 6, -2], device="cuda"), check_index=False)
    torch.cuda.synchronize()
    assert_bits_equal(out[0], x[1])
    assert not bits(out[1:]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_index_out_of_range_empty_x(device):
    x = make_x((0, 4), torch.float16, device)
    with pytest.raises(IndexError, match=r"0 <= index < 0|\[0, 0\)"):
        compact_tokens(x, idx([-1, 0], device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.float32, torch.float64, torch.bool, torch.uint8,
                                         torch.int16])
def test_index_wrong_dtype(index_dtype, device):
    x = make_x((6, 4), torch.float32, device)
    index = torch.tensor([0, 1], device=device).to(index_dtype)
    name = {torch.float32: "Float", torch.float64: "Double", torch.bool: "Bool",
            torch.uint8: "Byte", torch.int16: "Short"}[index_dtype]
    with pytest.raises(TypeError, match=rf"index must be int32 or int64, got {name}"):
        compact_tokens(x, index)
    with pytest.raises(TypeError, match=r"index must be int32 or int64"):
        ops.compact_tokens(x, index, True)
    with pytest.raises(TypeError, match=r"index must be int32 or int64"):
        ops.compact_tokens_out(x, index, torch.empty((2, 4), device=device), True)


@pytest.mark.parametrize("device", DEVICES)
def test_raw_op_needs_1d_index(device):
    x = make_x((6, 4), torch.float32, device)
    index = idx([[0, 1], [2, 3]], device=device)
    with pytest.raises(ValueError, match=r"index must be 1-D \[rows\], got shape \[2, 2\]"):
        ops.compact_tokens(x, index, True)
    with pytest.raises(ValueError, match=r"index must be 1-D \[rows\], got shape \[2, 2\]"):
        ops.compact_tokens_out(x, index, torch.empty((2, 2, 4), device=device), True)
    with pytest.raises(ValueError, match=r"index must be 1-D"):
        ops.compact_tokens(x, idx(3, device=device), True)
    with pytest.raises(ValueError, match=r"x must have a token dim"):
        ops.compact_tokens(torch.tensor(1.0, device=device), idx([0], device=device), True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_x_and_index_on_different_devices():
    x = make_x((6, 4), torch.float32, "cuda")
    with pytest.raises(ValueError, match=r"index must be on cuda.*got cpu"):
        compact_tokens(x, idx([0, 1]))
    with pytest.raises(ValueError, match=r"index must be on cpu.*got cuda"):
        compact_tokens(x.cpu(), idx([0, 1], device="cuda"))
    with pytest.raises(ValueError, match=r"index must be on cuda.*got cpu"):
        ops.scatter_add_tokens(x, idx([0, 1, 2, 3, 4, 5]), 6)


@pytest.mark.parametrize("device", DEVICES)
def test_wrapper_shape_errors(device):
    xb = make_x((2, 5, 4), torch.float32, device)
    with pytest.raises(ValueError, match=r"x \(2, 5, 4\) and index \(3, 2\) must agree on the "
                                         r"leading dims \(3,\)"):
        compact_tokens(xb, idx([[0, 1]] * 3, device=device))
    with pytest.raises(ValueError, match=r"must agree on the leading dims \(2, 4\)"):
        compact_tokens(xb, idx([[[0]] * 4] * 2, device=device))  # index [2, 4, 1] vs x [2, 5, 4]
    with pytest.raises(ValueError, match=r"x has 1 dims but index has 2 token dims"):
        compact_tokens(make_x((5,), torch.float32, device), idx([[0, 1]], device=device))
    with pytest.raises(ValueError, match=r"index must have at least one dim"):
        compact_tokens(xb, idx(0, device=device))
    with pytest.raises(TypeError, match=r"takes tensors x and index"):
        compact_tokens(xb, [0, 1])
    with pytest.raises(TypeError, match=r"takes tensors x and index"):
        compact_tokens(xb.tolist(), idx([0], device=device))


# ---- 5. autograd --------------------------------------------------------------------------------
def _grads(fn, x, index, upstream):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x, index)
    y.backward(upstream)
    return y.detach(), x.grad


def _random_float(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


AUTOGRAD_LAYOUTS = [
    # (name, x shape, index) with unique non-negative values
    ("rows", (7, 5), [6, -1, 0, 2, 5, -1]),
    ("rows_3d", (6, 3, 2), [1, 4, -1, 0]),
    ("padded", (2, 4, 3), [[3, 1, -1], [-1, 4, 7]]),
    ("token_only", (9,), [8, 0, -1, 4]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name,shape,values", AUTOGRAD_LAYOUTS, ids=[c[0] for c in AUTOGRAD_LAYOUTS])
def test_backward_unique_bitwise(name, shape, values, dtype, index_dtype, device):
    x = _random_float(shape, dtype, seed=41).to(device)
    index = idx(values, index_dtype, device)
    out_shape = (*index.shape, *shape[index.dim():])
    upstream = _random_float(out_shape, dtype, seed=42).to(device)
    y, gx = _grads(compact_tokens, x, index, upstream)
    y_ref, gx_ref = _grads(compact_tokens_reference, x, index, upstream)
    assert_bits_equal(y, y_ref)
    assert_bits_equal(gx, gx_ref)  # unique indices: no sums, so exact
    # rows that nothing gathered get exactly zero gradient
    picked = set(v for v in index.flatten().tolist() if v >= 0)
    flat = gx.reshape(-1, *shape[index.dim():])
    for r in range(flat.shape[0]):
        if r not in picked:
            assert not bits(flat[r]).any()


# Duplicate indices sum their gradients. The op adds in index order with one rounding per add
# (fp16/bf16 via a float32 accumulate, rounded back each step); the reference (index_put_ with
# accumulate) may add in another order, so allow a few ulps of the partial sums. With up to 4
# duplicates of N(0,1) values (|sum| < ~10): fp32 eps 1.2e-7, fp16 eps 9.8e-4 (ulp of 8 is
# 7.8e-3), bf16 eps 7.8e-3 (ulp of 8 is 6.3e-2); float64 gets a near-exact bound.
DUP_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=4e-3, atol=1.6e-2),
    torch.bfloat16: dict(rtol=3e-2, atol=1.3e-1),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_duplicates(dtype, index_dtype, device):
    x = _random_float((6, 5), dtype, seed=43).to(device)
    values = [2, 2, -1, 0, 2, 5, 0, 2, -1, 5]
    index = idx(values, index_dtype, device)
    upstream = _random_float((len(values), 5), dtype, seed=44).to(device)
    _, gx = _grads(compact_tokens, x, index, upstream)
    _, gx_ref = _grads(compact_tokens_reference, x, index, upstream)
    torch.testing.assert_close(gx, gx_ref, **DUP_TOL[dtype])
    # and against an exact float64 sum
    exact = torch.zeros(6, 5, dtype=torch.float64)
    for i, j in enumerate(values):
        if j >= 0:
            exact[j] += upstream[i].double().cpu()
    torch.testing.assert_close(gx.double().cpu(), exact, **DUP_TOL[dtype])
    for r in (1, 3, 4):  # rows never gathered
        assert not bits(gx[r]).any()

    xb = _random_float((2, 4, 3), dtype, seed=45).to(device)  # padded layout with duplicates
    index_b = idx([[1, 1, -1], [7, 1, 7]], index_dtype, device)
    up_b = _random_float((2, 3, 3), dtype, seed=46).to(device)
    _, gb = _grads(compact_tokens, xb, index_b, up_b)
    _, gb_ref = _grads(compact_tokens_reference, xb, index_b, up_b)
    torch.testing.assert_close(gb, gb_ref, **DUP_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_gradcheck(index_dtype, device):
    x = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    index = idx([4, -1, 1, 1, 0, -1, 4], index_dtype, device)
    assert torch.autograd.gradcheck(lambda t: compact_tokens(t, index), (x,))
    assert torch.autograd.gradgradcheck(lambda t: compact_tokens(t, index), (x,))
    xb = torch.randn(2, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    index_b = idx([[2, 2, -1, 0], [-1, 5, 3, 5]], index_dtype, device)
    assert torch.autograd.gradcheck(lambda t: compact_tokens(t, index_b), (xb,))
    assert torch.autograd.gradgradcheck(lambda t: compact_tokens(t, index_b), (xb,))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_scatter_add(device):
    g = torch.randn(6, 2, dtype=torch.float64, device=device, requires_grad=True)
    index = idx([3, 0, -1, 3, 1, 3], device=device)
    assert torch.autograd.gradcheck(lambda t: ops.scatter_add_tokens(t, index, 4), (g,))
    assert torch.autograd.gradgradcheck(lambda t: ops.scatter_add_tokens(t, index, 4), (g,))


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_values(device):
    # d/d(upstream) of <x.grad, v> is compact(v): check the second-order path gives the numbers.
    x = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    index = idx([4, 4, -1, 2], device=device)
    up = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    (gx,) = torch.autograd.grad(compact_tokens(x, index), x, up, create_graph=True)
    v = torch.randn(5, 3, dtype=torch.float64, device=device)
    (gup,) = torch.autograd.grad((gx * v).sum(), up)
    assert torch.equal(gup, compact_tokens_reference(v, index))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_x_no_grad(dtype, device):
    x = make_x((6, 2), dtype, device, seed=47)
    with pytest.raises(RuntimeError, match="floating point"):
        x.requires_grad_(True)
    index = idx([5, -1, 0, 0], device=device)
    with torch.no_grad():
        out = compact_tokens(x, index)
    assert_bits_equal(out, compact_tokens_reference(x, index))
    # and with grad mode on but nothing requiring grad
    out2 = compact_tokens(x, index)
    assert out2.grad_fn is None
    assert_bits_equal(out2, out)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_non_contiguous_x_and_grad(device):
    base = torch.randn(5, 8, device=device, requires_grad=True)
    x = base[:, ::2]
    index = idx([4, -1, 0, 3], device=device)
    up = torch.randn(4, 4, device=device).t()  # a non-contiguous upstream gradient
    compact_tokens(x, index).backward(up)
    base_ref = base.detach().clone().requires_grad_(True)
    compact_tokens_reference(base_ref[:, ::2], index).backward(up)
    assert_bits_equal(base.grad, base_ref.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_empty_index(device):
    x = torch.randn(5, 4, device=device, requires_grad=True)
    y = compact_tokens(x, idx([], device=device))
    assert y.shape == (0, 4)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(5, 4, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_source_with_strided_features(device):
    """0 source rows, features not contiguous, all -1: zero rows of the right size (found by
    hypothesis: the row size was once taken as 0, leaving the output uninitialised)."""
    x = make_x((0, 2, 3), torch.float32, device)[..., :1]
    out = compact_tokens(x, idx([-1, -1], device=device))
    assert out.shape == (2, 2, 1) and torch.equal(out, torch.zeros_like(out))
    buf = torch.full((2, 2, 1), 7.0, device=device)
    assert torch.equal(compact_tokens(x, idx([-1, -1], device=device), out=buf), torch.zeros_like(buf))


def test_out_refuses_autograd():
    """out= cannot carry a gradient: refused instead of silently dropping it."""
    x = torch.randn(6, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"out=.*does not support automatic differentiation"):
        compact_tokens(x, idx([0, 1, 2]), out=torch.empty(3, 4))
    with torch.no_grad():
        compact_tokens(x, idx([0, 1, 2]), out=torch.empty(3, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_empty_index_token_only(device):
    # the 1-D case (row_elems = 1) works
    x = torch.randn(5, device=device, requires_grad=True)
    compact_tokens(x, idx([], device=device)).sum().backward()
    assert torch.equal(x.grad, torch.zeros(5, device=device))


# ---- scatter_add_tokens -----------------------------------------------------------------------------
# The op adds rows in index order with one rounding per add; index_add_ on CPU does the same, on
# CUDA both use atomics in an unspecified order. Tolerances: as DUP_TOL (sums of <= 4 N(0,1)).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("feat", [(), (3,), (2, 5)], ids=lambda f: f"feat{list(f)}")
def test_scatter_add_tokens(feat, dtype, index_dtype, device):
    values = [3, 0, -1, 3, 1, 3, -1, 0, 6]
    num_rows = 8
    grad = _random_float((len(values), *feat), dtype, seed=51).to(device)
    index = idx(values, index_dtype, device)
    out = ops.scatter_add_tokens(grad, index, num_rows)
    keep = index >= 0
    expected = torch.zeros((num_rows, *feat), dtype=dtype, device=device).index_add_(
        0, index[keep].long(), grad[keep])
    assert out.shape == expected.shape and out.dtype == dtype and out.device == expected.device
    torch.testing.assert_close(out, expected, **DUP_TOL[dtype])
    for r in (2, 4, 5, 7):  # rows nobody adds to are exact zeros
        assert not bits(out[r]).any()
    # rows with a single contribution are copied exactly
    assert_bits_equal(out[6], grad[8])
    assert_bits_equal(out[1], grad[4])


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_add_tokens_non_contiguous_grad(device):
    grad = torch.randn(4, 6, device=device)[:, ::2]
    index = idx([1, 1, -1, 0], device=device)[:]
    out = ops.scatter_add_tokens(grad, index, 3)
    expected = torch.zeros(3, 3, device=device).index_add_(0, idx([1, 1, 0], device=device),
                                                           grad[[0, 1, 3]])
    torch.testing.assert_close(out, expected, **DUP_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_add_tokens_errors(device):
    g = torch.randn(3, 2, device=device)
    with pytest.raises(TypeError, match=r"supports float32, float16, bfloat16 and float64 "
                                        r"gradients, got Long"):
        ops.scatter_add_tokens(g.long(), idx([0, 1, 2], device=device), 3)
    with pytest.raises(ValueError, match=r"index has 2 rows but grad has 3"):
        ops.scatter_add_tokens(g, idx([0, 1], device=device), 3)
    with pytest.raises(ValueError, match=r"num_rows must be >= 0, got -1"):
        ops.scatter_add_tokens(g, idx([0, 1, 2], device=device), -1)
    with pytest.raises(TypeError, match=r"index must be int32 or int64, got Float"):
        ops.scatter_add_tokens(g, idx([0, 1, 2], device=device).float(), 3)
    if device == "cpu":  # the CUDA kernel cannot report synchronously
        with pytest.raises(IndexError, match=r"index\[1\] = 3 is out of range.*0 <= index < 3"):
            ops.scatter_add_tokens(g, idx([0, 3, 2], device=device), 3)
        with pytest.raises(IndexError, match=r"index\[0\] = -2"):
            ops.scatter_add_tokens(g, idx([-2, 0, 2], device=device), 3)


# ---- 6. opcheck (one sample per op) --------------------------------------------------------------
def test_opcheck_compact_tokens():
    x = torch.randn(6, 3, requires_grad=True)
    index = idx([0, 5, -1, 5, 2])
    torch.library.opcheck(ops.compact_tokens.default, (x, index, True))


def test_opcheck_compact_tokens_out():
    x = torch.randn(6, 3)
    index = idx([0, 5, -1, 5, 2], torch.int32)
    torch.library.opcheck(ops.compact_tokens_out.default, (x, index, torch.empty(5, 3), True))


def test_opcheck_scatter_add_tokens():
    grad = torch.randn(5, 3, requires_grad=True)
    index = idx([0, 5, -1, 5, 2])
    torch.library.opcheck(ops.scatter_add_tokens.default, (grad, index, 6))


# ---- 7. torch.compile -----------------------------------------------------------------------------
def _compile_or_skip(fn):
    try:
        import torch._dynamo  # noqa: F401
    except Exception as exc:  # pragma: no cover - platform without dynamo
        pytest.skip(f"torch.compile is unavailable here: {exc}")
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_torch_compile_fullgraph():
    def f(x, index):
        return compact_tokens(x, index) * 2 + 1

    def g(x, index, out):
        compact_tokens(x, index, out=out)
        return out.sum(dim=-1)

    cf, cg = _compile_or_skip(f), _compile_or_skip(g)
    x = torch.randn(7, 4)
    index = idx([6, -1, 0, 0, 3])
    torch.testing.assert_close(cf(x, index), compact_tokens_reference(x, index) * 2 + 1,
                               rtol=0, atol=0)
    xb = torch.randn(2, 5, 3)
    index_b = idx([[-1, 1, 4], [5, 9, 9]], torch.int32)
    torch.testing.assert_close(cf(xb, index_b), compact_tokens_reference(xb, index_b) * 2 + 1,
                               rtol=0, atol=0)
    out = torch.full((5, 4), 9.0)
    s = cg(x, index, out)
    assert_bits_equal(out, compact_tokens_reference(x, index))
    torch.testing.assert_close(s, out.sum(dim=-1), rtol=0, atol=0)


def test_torch_compile_backward():
    def f(x, index):
        return (compact_tokens(x, index) ** 2).sum()

    cf = _compile_or_skip(f)
    x = torch.randn(6, 3, requires_grad=True)
    index = idx([5, 5, -1, 0])
    cf(x, index).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    f(x_ref, index).backward()
    assert_bits_equal(x.grad, x_ref.grad)


# ---- 8. property test -------------------------------------------------------------------------------
@st.composite
def compaction_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    index_dtype = draw(st.sampled_from(INDEX_DTYPES))
    padded = draw(st.booleans())
    # feature sizes >= 1: zero-width rows break the reference (see test_zero_width_rows)
    feat = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)))
    if padded:
        B = draw(st.integers(1, 3))
        S = draw(st.integers(0, 5))
        S2 = draw(st.integers(0, 5))
        rows, lead, index_shape = B * S, (B, S), (B, S2)
    else:
        T = draw(st.integers(0, 12))
        n = draw(st.integers(0, 12))
        rows, lead, index_shape = T, (T,), (n,)
    count = 1
    for s in index_shape:
        count *= s
    values = draw(st.lists(st.integers(-1, rows - 1), min_size=count, max_size=count))
    seed = draw(st.integers(0, 2**16))
    view = draw(st.sampled_from(["contiguous", "row_strided", "offset"]))
    return dtype, index_dtype, lead, feat, index_shape, values, seed, view


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(compaction_cases())
def test_property_matches_reference(case):
    dtype, index_dtype, lead, feat, index_shape, values, seed, view = case
    shape = (*lead, *feat)
    if view == "row_strided" and len(lead) == 1:
        x = make_x((lead[0], *feat[:-1], (feat[-1] if feat else 1) + 2), dtype, seed=seed)
        x = x[..., :feat[-1]] if feat else x[:, 0]
    elif view == "offset":
        n = 1
        for s in shape:
            n *= s
        x = make_x((n + 1,), dtype, seed=seed)[1:].view(shape)
    else:
        x = make_x(shape, dtype, seed=seed)
    assert x.shape == shape
    index = torch.tensor(values, dtype=index_dtype).reshape(index_shape)
    expected = ref_on_contiguous(x, index)
    assert_bits_equal(compact_tokens(x, index), expected)
    out = torch.empty((*index_shape, *feat), dtype=dtype)
    assert compact_tokens(x, index, out=out) is out
    assert_bits_equal(out, expected)


# ---- 5. hardening (issue 14): mixed meta/real devices, out= requiring grad ---------------------
def test_mixed_meta_and_cpu_raise_instead_of_returning_garbage():
    # The dispatcher sends a call with any meta tensor to the fake kernel: it must check devices
    # as the real op does, not hand back uninitialised CPU memory (D4).
    x = make_x((6, 4), torch.float32)
    meta_index = idx([0, 1, 2]).to("meta")
    with pytest.raises(ValueError, match=r"index must be on cpu.*got meta"):
        compact_tokens(x, meta_index)
    with pytest.raises(ValueError, match=r"index must be on meta.*got cpu"):
        compact_tokens(x.to("meta"), idx([0, 1, 2]))
    with pytest.raises(ValueError, match=r"out must be on cpu.*got meta"):
        torch.ops.adsc.compact_tokens_out(x, idx([0, 1]), torch.empty((2, 4), device="meta"), True)
    with pytest.raises(ValueError, match=r"index must be on cpu.*got meta"):
        ops.scatter_add_tokens(x, idx([0, 1, 2, 3, 4, 5]).to("meta"), 6)
    # All-meta calls still give shapes (what torch.compile and shape inference need).
    out = torch.ops.adsc.compact_tokens(x.to("meta"), meta_index, True)
    assert out.device.type == "meta" and out.shape == (3, 4)


def test_fake_kernels_repeat_the_real_checks():
    x = make_x((6, 4), torch.float32, "meta")
    with pytest.raises(TypeError, match="index must be int32 or int64, got Float"):
        torch.ops.adsc.compact_tokens(x, torch.zeros(3, device="meta"), True)
    with pytest.raises(ValueError, match=r"index must be 1-D"):
        torch.ops.adsc.compact_tokens(x, torch.zeros((3, 1), dtype=torch.int64, device="meta"), True)
    with pytest.raises(ValueError, match="token dim"):
        torch.ops.adsc.compact_tokens(torch.zeros((), device="meta"), idx([0]).to("meta"), True)
    with pytest.raises(TypeError, match="out must have x's dtype"):
        torch.ops.adsc.compact_tokens_out(x, idx([0]).to("meta"),
                                          torch.empty((1, 4), dtype=torch.float64, device="meta"), True)
    with pytest.raises(ValueError, match=r"out must have shape \[2, 4\]"):
        torch.ops.adsc.compact_tokens_out(x, idx([0, 1]).to("meta"), torch.empty((3, 4), device="meta"), True)
    with pytest.raises(ValueError, match="index has 2 rows but grad has 6"):
        ops.scatter_add_tokens(x, idx([0, 1]).to("meta"), 6)
    with pytest.raises(TypeError, match="scatter_add_tokens supports float32"):
        ops.scatter_add_tokens(x.int(), idx([0] * 6).to("meta"), 6)


@pytest.mark.parametrize("device", DEVICES)
def test_out_that_requires_grad_is_refused(device):
    # Writing into a tensor autograd tracks would leave it with a wrong history (D8).
    x = make_x((6, 4), torch.float32, device)
    out = torch.zeros((3, 4), device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="out requires grad"):
        compact_tokens(x, idx([0, 1, 2], device=device), out=out)
    assert torch.equal(out.detach(), torch.zeros_like(out))
    with torch.no_grad():  # as for any in-place write, fine without autograd
        compact_tokens(x, idx([0, 1, 2], device=device), out=out)
    assert_bits_equal(out.detach(), x[:3])


# ---- hardening (issue 18): an index that lives inside out -------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_index_inside_out_is_refused(device):
    # The rows gathered first overwrote the index still to be read (out-of-bounds rows followed).
    x = torch.arange(8, dtype=torch.int64, device=device).view(4, 2) * 1000
    out = torch.zeros(3, 2, dtype=torch.int64, device=device)
    index = out.view(-1)[:3]
    index.copy_(torch.tensor([1, 2, 0], device=device))
    before = out.clone()
    with pytest.raises(ValueError, match="compact: dst and index overlap in memory"):
        compact_tokens(x, index, out=out)
    with pytest.raises(ValueError, match="dst and index overlap"):
        ops.compact_tokens_out(x, index, out)
    assert torch.equal(out, before)  # nothing written
    # A copy of the index is fine; so is an index that shares memory with x (both only read).
    compact_tokens(x, index.clone(), out=out)
    assert torch.equal(out, compact_tokens_reference(x, before.view(-1)[:3]))
    xi = torch.tensor([[1, 0], [5, 7]], dtype=torch.int64, device=device)
    got = compact_tokens(xi, xi[0])
    assert torch.equal(got, compact_tokens_reference(xi, xi[0].clone()))
