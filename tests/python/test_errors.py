"""Every error path of moequant.ops raises ValueError whose message names the argument and what was expected.

Messages follow the core's convention (libmoequant/include/moequant/status.h): "<argument>: expected <what>,
got <actual>".
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from moequant import ops


def assert_value_error(arg: str, fn, *args, also: str | None = None, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert re.search(rf"(^|\W){re.escape(arg)}: expected", msg), f"message does not name {arg!r}: {msg!r}"
    if also is not None:
        assert also in msg, f"message does not mention {also!r}: {msg!r}"
    return msg


def w_with(value, at=(3, 5)):
    w = torch.randn(8, 64)
    w[at] = value
    return w


def h_with(value, at=(7, 9)):
    h = torch.eye(64)
    h[at] = value
    return h


H64 = torch.eye(64)

# --- quantize_rtn / gptq_quantize: the weight, the Hessian and the format ----------------------------------------

RTN_CASES = [
    ("nan", "w", lambda: ops.quantize_rtn(w_with(math.nan), 4, 32), "NaN"),
    ("inf", "w", lambda: ops.quantize_rtn(w_with(-math.inf), 4, 32), "Inf"),
    ("int-weight", "w", lambda: ops.quantize_rtn(torch.ones(8, 64, dtype=torch.int32), 4, 32), None),
    ("1-d", "w", lambda: ops.quantize_rtn(torch.randn(64), 4, 32), None),
    ("3-d", "w", lambda: ops.quantize_rtn(torch.randn(2, 8, 64), 4, 32), None),
    ("group-not-dividing", "group_size", lambda: ops.quantize_rtn(torch.randn(8, 64), 4, 48), "64"),
    ("group-larger", "group_size", lambda: ops.quantize_rtn(torch.randn(8, 64), 4, 128), None),
    ("group-zero", "group_size", lambda: ops.quantize_rtn(torch.randn(8, 64), 4, 0), None),
    ("bits-1", "bits", lambda: ops.quantize_rtn(torch.randn(8, 64), 1, 32), "[2, 8]"),
    ("bits-9", "bits", lambda: ops.quantize_rtn(torch.randn(8, 64), 9, 32), "[2, 8]"),
    ("bits-float", "bits", lambda: ops.quantize_rtn(torch.randn(8, 64), 4.0, 32), None),
    ("scale-search", "scale_search", lambda: ops.quantize_rtn(torch.randn(8, 64), 4, 32, scale_search="l2"), None),
    ("mse-grid", "mse_grid",
     lambda: ops.quantize_rtn(torch.randn(8, 64), 4, 32, scale_search="mse", mse_grid=0), None),
    ("mse-shrink-0", "mse_min_shrink",
     lambda: ops.quantize_rtn(torch.randn(8, 64), 4, 32, scale_search="mse", mse_min_shrink=0.0), None),
    ("mse-shrink-big", "mse_min_shrink",
     lambda: ops.quantize_rtn(torch.randn(8, 64), 4, 32, scale_search="mse", mse_min_shrink=1.5), None),
    ("mse-norm", "mse_norm",
     lambda: ops.quantize_rtn(torch.randn(8, 64), 4, 32, scale_search="mse", mse_norm=0.0), None),
    ("mse-norm-inf", "mse_norm",
     lambda: ops.quantize_rtn(torch.randn(8, 64), 4, 32, scale_search="mse", mse_norm=math.inf), None),
    ("scale-dtype", "scale_dtype", lambda: ops.quantize_rtn(torch.randn(8, 64), 4, 32, scale_dtype=torch.int8), None),
]

GPTQ_CASES = [
    ("w-nan", "w", lambda: ops.gptq_quantize(w_with(math.nan), H64, 4, 32), "NaN"),
    ("w-inf", "w", lambda: ops.gptq_quantize(w_with(math.inf), H64, 4, 32), "Inf"),
    ("w-int", "w", lambda: ops.gptq_quantize(torch.ones(8, 64, dtype=torch.int64), H64, 4, 32), None),
    ("w-1d", "w", lambda: ops.gptq_quantize(torch.randn(64), H64, 4, 32), None),
    ("h-nan", "h", lambda: ops.gptq_quantize(torch.randn(8, 64), h_with(math.nan), 4, 32), "NaN"),
    ("h-inf", "h", lambda: ops.gptq_quantize(torch.randn(8, 64), h_with(math.inf, (2, 2)), 4, 32), "Inf"),
    ("h-nan-f64", "h", lambda: ops.gptq_quantize(torch.randn(8, 64), h_with(math.nan).double(), 4, 32), "NaN"),
    ("h-not-square", "h", lambda: ops.gptq_quantize(torch.randn(8, 64), torch.eye(64)[:, :32], 4, 32), None),
    ("h-wrong-size", "h", lambda: ops.gptq_quantize(torch.randn(8, 64), torch.eye(32), 4, 32), "64"),
    ("h-int", "h", lambda: ops.gptq_quantize(torch.randn(8, 64), torch.eye(64, dtype=torch.int32), 4, 32), None),
    ("h-3d", "h", lambda: ops.gptq_quantize(torch.randn(8, 64), torch.eye(64)[None], 4, 32), None),
    ("damp-0", "damp", lambda: ops.gptq_quantize(torch.randn(8, 64), H64, 4, 32, damp=0.0), None),
    ("damp-neg", "damp", lambda: ops.gptq_quantize(torch.randn(8, 64), H64, 4, 32, damp=-0.01), None),
    ("damp-nan", "damp", lambda: ops.gptq_quantize(torch.randn(8, 64), H64, 4, 32, damp=math.nan), None),
    ("damp-inf", "damp", lambda: ops.gptq_quantize(torch.randn(8, 64), H64, 4, 32, damp=math.inf), None),
    ("block-0", "block_size", lambda: ops.gptq_quantize(torch.randn(8, 64), H64, 4, 32, block_size=0), None),
    ("block-neg", "block_size", lambda: ops.gptq_quantize(torch.randn(8, 64), H64, 4, 32, block_size=-128), None),
    ("bits-1", "bits", lambda: ops.gptq_quantize(torch.randn(8, 64), H64, 1, 32), None),
    ("bits-9", "bits", lambda: ops.gptq_quantize(torch.randn(8, 64), H64, 9, 32), None),
    ("group", "group_size", lambda: ops.gptq_quantize(torch.randn(8, 64), H64, 4, 24), None),
    ("mse-grid", "mse_grid",
     lambda: ops.gptq_quantize(torch.randn(8, 64), H64, 4, 32, scale_search="mse", mse_grid=-1), None),
]


@pytest.mark.parametrize("arg, fn, also", [c[1:] for c in RTN_CASES], ids=[c[0] for c in RTN_CASES])
def test_quantize_rtn_errors(arg, fn, also):
    assert_value_error(arg, fn, also=also)


@pytest.mark.parametrize("arg, fn, also", [c[1:] for c in GPTQ_CASES], ids=[c[0] for c in GPTQ_CASES])
def test_gptq_errors(arg, fn, also):
    assert_value_error(arg, fn, also=also)


def test_nan_message_gives_position():
    msg = assert_value_error("w", ops.quantize_rtn, w_with(math.nan, (3, 5)), 4, 32)
    assert "3" in msg and "5" in msg, msg


# --- packing ------------------------------------------------------------------------------------------------------

PACK_CASES = [
    ("code-too-big", "q", lambda: ops.pack_int32(torch.tensor([[0, 8]], dtype=torch.int8), 4), "[-8, 7]"),
    ("code-too-small", "q", lambda: ops.pack_int32(torch.tensor([[-9]], dtype=torch.int8), 4), "[-8, 7]"),
    ("code-2bit", "q", lambda: ops.pack_int32(torch.tensor([[2]], dtype=torch.int8), 2), "[-2, 1]"),
    ("code-int64-range", "q", lambda: ops.pack_int32(torch.tensor([[1000]], dtype=torch.int64), 8), None),
    ("float-codes", "q", lambda: ops.pack_int32(torch.zeros(2, 8), 4), None),
    ("1d-codes", "q", lambda: ops.pack_int32(torch.zeros(8, dtype=torch.int8), 4), None),
    ("bits-1", "bits", lambda: ops.pack_int32(torch.zeros(2, 8, dtype=torch.int8), 1), None),
    ("bits-9", "bits", lambda: ops.pack_int32(torch.zeros(2, 8, dtype=torch.int8), 9), None),
    ("unpack-too-many", "in_features", lambda: ops.unpack_int32(torch.zeros(2, 4, dtype=torch.int32), 4, 40), None),
    ("unpack-too-few", "in_features", lambda: ops.unpack_int32(torch.zeros(2, 4, dtype=torch.int32), 4, 24), None),
    ("unpack-3bit", "in_features", lambda: ops.unpack_int32(torch.zeros(1, 2, dtype=torch.int32), 3, 22), None),
    ("unpack-negative", "in_features", lambda: ops.unpack_int32(torch.zeros(2, 4, dtype=torch.int32), 4, -1), None),
    ("unpack-not-int32", "packed", lambda: ops.unpack_int32(torch.zeros(2, 4, dtype=torch.int64), 4, 32), None),
    ("unpack-bits", "bits", lambda: ops.unpack_int32(torch.zeros(2, 4, dtype=torch.int32), 9, 32), None),
    ("zp-range", "zero_point", lambda: ops.pack_zero_points(torch.full((8, 2), 8, dtype=torch.int8), 4), None),
    ("zp-unpack", "out_features",
     lambda: ops.unpack_zero_points(torch.zeros(1, 2, dtype=torch.int32), 4, 16), None),
    ("dequant-group", "group_size",
     lambda: ops.dequantize(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2, 2), None, 3), None),
]


@pytest.mark.parametrize("arg, fn, also", [c[1:] for c in PACK_CASES], ids=[c[0] for c in PACK_CASES])
def test_pack_errors(arg, fn, also):
    assert_value_error(arg, fn, also=also)


# --- Hessian accumulation -----------------------------------------------------------------------------------------


def acc_add(ids=None, weights=None, x=None, experts=4, dim=8):
    acc = ops.HessianAccumulator(experts, dim, dtype=torch.float64)
    x = torch.randn(5, dim) if x is None else x
    ids = torch.tensor([0, 1, 2, 3, 0]) if ids is None else ids
    acc.add(x, ids, weights)
    return acc


HESSIAN_CASES = [
    ("id-negative", "expert_ids", lambda: acc_add(ids=torch.tensor([0, 1, -1, 3, 0])), None),
    ("id-too-big", "expert_ids", lambda: acc_add(ids=torch.tensor([0, 1, 5, 3, 0])), None),
    ("id-float", "expert_ids", lambda: acc_add(ids=torch.tensor([0.0, 1, 2, 3, 0])), None),
    ("id-length", "expert_ids", lambda: acc_add(ids=torch.tensor([0, 1, 2])), None),
    ("weight-negative", "weights", lambda: acc_add(weights=torch.tensor([0.5, 0.5, -0.1, 0.5, 0.5])), None),
    ("weight-nan", "weights", lambda: acc_add(weights=torch.tensor([0.5, math.nan, 0.5, 0.5, 0.5])), None),
    ("weight-length", "weights", lambda: acc_add(weights=torch.ones(4)), None),
    ("x-columns", "x", lambda: acc_add(x=torch.randn(5, 7)), None),
    ("x-1d", "x", lambda: acc_add(x=torch.randn(8)), None),
    ("x-int", "x", lambda: acc_add(x=torch.ones(5, 8, dtype=torch.int32)), None),
    ("num-experts", "num_experts", lambda: ops.HessianAccumulator(0, 8), None),
    ("dim", "dim", lambda: ops.HessianAccumulator(4, 0), None),
    ("dtype", "dtype", lambda: ops.HessianAccumulator(4, 8, dtype=torch.float16), None),
    ("merge-experts", "other",
     lambda: ops.HessianAccumulator(4, 8).merge(ops.HessianAccumulator(5, 8)), None),
    ("merge-dim", "other", lambda: ops.HessianAccumulator(4, 8).merge(ops.HessianAccumulator(4, 16)), None),
    ("merge-type", "other", lambda: ops.HessianAccumulator(4, 8).merge(torch.zeros(4, 8, 8)), None),
]


@pytest.mark.parametrize("arg, fn, also", [c[1:] for c in HESSIAN_CASES], ids=[c[0] for c in HESSIAN_CASES])
def test_hessian_errors(arg, fn, also):
    assert_value_error(arg, fn, also=also)


@pytest.mark.parametrize(
    "ids, weights",
    [(torch.tensor([0, 1, 9, 3, 0]), None), (torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1.0, 1, 1, -1, 1]))],
)
def test_failed_add_leaves_state_untouched(ids, weights):
    acc = ops.HessianAccumulator(4, 8, dtype=torch.float32)
    acc.add(torch.randn(3, 8), torch.tensor([0, 1, 1]))
    before = (acc.hessians.clone(), acc.counts.clone(), acc.mass.clone())
    with pytest.raises(ValueError):
        acc.add(torch.randn(5, 8), ids, weights)
    assert torch.equal(acc.hessians, before[0]) and torch.equal(acc.counts, before[1])
    assert torch.equal(acc.mass, before[2])


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_float16_scale_overflow_names_the_group_and_the_remedy(method):
    # A group spanning 3e6 at 4 bits needs a scale of 2e5 > 65504: float16 scales would be inf (NaN weights).
    w = torch.zeros(3, 64)
    w[2, 40] = 3e6
    kw = dict(bits=4, group_size=32, scale_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"scale_dtype: float16 cannot hold the scale of group \(2, 1\).*bfloat16"):
        if method == "rtn":
            ops.quantize_rtn(w, **kw)
        else:
            ops.gptq_quantize(w, torch.eye(64), **kw)
    qt = ops.quantize_rtn(w, bits=4, group_size=32, scale_dtype=torch.bfloat16)  # the remedy works
    assert torch.isfinite(qt.scale).all() and torch.isfinite(qt.dequantized).all()
