"""The neighborhood-attention op layer (``visattn.kernels``): official golden, an independent
brute force (fixed and Hypothesis-drawn cases), gradients, strided views, half precision, NATTEN
parity for stride, argument validation and the reference backend's slab splitting."""
import itertools
import json
import math
import os
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import visattn.kernels.reference as reference
from visattn.kernels import available_backends, na1d, na2d, na3d

NA = {1: na1d, 2: na2d, 3: na3d}
IntOrTuple = Union[int, Tuple[int, ...]]


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Every tensor here is tiny: intra-op threads only add synchronisation cost (10x on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _golden_dir() -> Path:
    """``../shared/golden`` next to the checkout, else ``$VISATTN_GOLDEN_DIR``."""
    default = Path(__file__).resolve().parents[2] / "shared" / "golden"
    if default.is_dir() or "VISATTN_GOLDEN_DIR" not in os.environ:
        return default
    return Path(os.environ["VISATTN_GOLDEN_DIR"])


GOLDEN_DIR = _golden_dir()
GOLDEN_META = GOLDEN_DIR / "na2d_rpb_op.json"


def _golden_case_ids() -> List[int]:
    # With the data absent, one case is still collected so that the golden tests fail loudly.
    if not GOLDEN_META.exists():
        return [0]
    return [case["case"] for case in json.loads(GOLDEN_META.read_text())["cases"]]


# --------------------------------------------------------------------------------------------
# Independent brute force: per-query Python loops over the documented window rule.
# --------------------------------------------------------------------------------------------


def _axis_window(p: int, length: int, k: int, d: int, s: int) -> List[Tuple[int, int]]:
    """``(key position, rpb offset)`` of the ``k`` keys that query ``p`` attends to on one axis."""
    group, i = p % d, p // d
    sub_len = len(range(group, length, d))
    leader = min((i // s) * s + s // 2, sub_len - 1)
    start = max(0, min(leader - k // 2, sub_len - k))
    return [(j * d + group, j - i + k - 1) for j in range(start, start + k)]


def _as_tuple(value: IntOrTuple, ndim: int) -> Tuple[int, ...]:
    return (value,) * ndim if isinstance(value, int) else tuple(value)


def brute_force_na(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    stride: IntOrTuple = 1,
    rpb: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Neighborhood attention on heads-last ``[B, *spatial, heads, D]``, one query at a time."""
    spatial = tuple(q.shape[1:-2])
    ndim = len(spatial)
    ks, ds, ss = (_as_tuple(x, ndim) for x in (kernel_size, dilation, stride))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
    for pos in itertools.product(*(range(n) for n in spatial)):
        per_axis = [_axis_window(p, n, kk, d, s) for p, n, kk, d, s in zip(pos, spatial, ks, ds, ss)]
        window = list(itertools.product(*per_axis))  # every (key, rel) combination over the axes
        keys = tuple(list(axis) for axis in zip(*[[key for key, _ in nb] for nb in window]))
        k_win, v_win = k[(slice(None),) + keys], v[(slice(None),) + keys]  # [B, window, heads, D]
        logits = scale * (q[(slice(None),) + pos].unsqueeze(1) * k_win).sum(-1)  # [B, window, heads]
        if rpb is not None:
            rels = tuple(list(axis) for axis in zip(*[[rel for _, rel in nb] for nb in window]))
            logits = logits + rpb[(slice(None),) + rels].T
        attn = logits.softmax(dim=1)
        out[(slice(None),) + pos] = (attn.unsqueeze(-1) * v_win).sum(1)
    return out


def _qkv(
    batch: int,
    spatial: Sequence[int],
    heads: int,
    head_dim: int,
    v_dim: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = (batch, *spatial, heads)
    q, k = torch.randn(2, *shape, head_dim, dtype=dtype, generator=generator).unbind(0)
    v = torch.randn(*shape, v_dim or head_dim, dtype=dtype, generator=generator)
    return q, k, v


def _rpb(
    heads: int, kernel: Sequence[int], dtype: torch.dtype = torch.float64, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    return torch.randn(heads, *(2 * kk - 1 for kk in kernel), dtype=dtype, generator=generator)


# --------------------------------------------------------------------------------------------
# 1. Official golden (NATTEN 0.14.4 kernel port, float64 reference stored as float32).
# --------------------------------------------------------------------------------------------


def _load_golden_case(case: int):
    assert GOLDEN_META.exists(), f"golden data missing: {GOLDEN_META} (set VISATTN_GOLDEN_DIR)"
    meta = json.loads(GOLDEN_META.read_text())["cases"][case]
    io = load_file(str(GOLDEN_DIR / "na2d_rpb_op.io.safetensors"))
    q, k, v, out = (io[f"case{case}.{name}"].permute(0, 2, 3, 1, 4) for name in ("q", "k", "v", "out"))
    return meta, q, k, v, io[f"case{case}.rpb"], out


@pytest.mark.parametrize("case", _golden_case_ids())
def test_golden_na2d_rpb(case: int):
    """na2d with rpb reproduces the official NATTEN 0.14.4 outputs (atol 1e-5)."""
    meta, q, k, v, rpb, expected = _load_golden_case(case)
    assert q.shape == (meta["batch"], meta["H"], meta["W"], meta["heads"], meta["head_dim"])
    out = na2d(q, k, v, meta["kernel_size"], meta["dilation"], rpb=rpb, scale=meta["scale"])
    assert out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", _golden_case_ids())
def test_golden_matches_brute_force(case: int):
    """The test's own brute force agrees with the official golden, so it is a valid oracle."""
    meta, q, k, v, rpb, expected = _load_golden_case(case)
    out = brute_force_na(
        *(t.double() for t in (q, k, v)), meta["kernel_size"], meta["dilation"], rpb=rpb.double(), scale=meta["scale"]
    )
    torch.testing.assert_close(out, expected.double(), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 2. Reference backend vs brute force, float64.
# --------------------------------------------------------------------------------------------

# (spatial, kernel_size, dilation, stride, with rpb)
BRUTE_FORCE_CASES = [
    ((9,), 3, 1, 1, False),
    ((13,), 5, 2, 1, True),
    ((17,), 3, 4, 2, True),
    ((11,), 5, 1, 4, True),
    ((10,), 7, 1, 7, False),
    ((7,), 1, 1, 1, True),
    ((7, 9), 3, 1, 1, True),
    ((8, 11), 5, 1, 1, False),
    ((11, 7), 3, 2, 1, True),
    ((13, 10), (3, 5), (4, 2), (1, 1), True),
    ((10, 13), 3, 3, 2, True),
    ((9, 11), (5, 3), (1, 2), (3, 2), True),
    ((12, 7), 5, 1, 5, False),
    ((14, 9), (7, 3), (2, 1), (4, 3), True),
    ((5, 6, 7), 3, 1, 1, True),
    ((7, 5, 6), (3, 3, 1), (2, 1, 3), (1, 2, 1), True),
    ((6, 7, 5), 3, (2, 1, 1), (3, 2, 1), False),
    ((4, 7, 9), (3, 5, 3), (1, 1, 3), (2, 5, 3), True),
]


@pytest.mark.parametrize("spatial, kernel_size, dilation, stride, with_rpb", BRUTE_FORCE_CASES)
def test_reference_matches_brute_force(spatial, kernel_size, dilation, stride, with_rpb):
    """The reference backend equals the per-query brute force in float64 (1e-10), including
    ragged sizes (not multiples of dilation or stride), per-axis tuples, rpb and D_v != D."""
    ndim = len(spatial)
    q, k, v = _qkv(2, spatial, heads=2, head_dim=4, v_dim=3)
    rpb = _rpb(2, _as_tuple(kernel_size, ndim)) if with_rpb else None
    out = NA[ndim](q, k, v, kernel_size, dilation, stride, rpb=rpb, backend="reference")
    expected = brute_force_na(q, k, v, kernel_size, dilation, stride, rpb=rpb)
    assert out.shape == (2, *spatial, 2, 3) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_explicit_scale_and_default_scale():
    """``scale`` multiplies q . k; the default is ``head_dim ** -0.5``."""
    q, k, v = _qkv(1, (7, 8), heads=3, head_dim=5)
    rpb = _rpb(3, (3, 3))
    torch.testing.assert_close(
        na2d(q, k, v, 3, rpb=rpb, scale=0.3), brute_force_na(q, k, v, 3, rpb=rpb, scale=0.3), rtol=1e-10, atol=1e-10
    )
    assert torch.equal(na2d(q, k, v, 3, rpb=rpb), na2d(q, k, v, 3, rpb=rpb, scale=5 ** -0.5))


def test_reference_module_compiles_fullgraph():
    """On CPU (the reference backend) NeighborhoodAttention2d traces into one graph under
    torch.compile; output and gradients equal eager."""
    from visattn.layers import NeighborhoodAttention2d

    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(32, 2, (5, 5), (2, 1), backend="reference")
    x = torch.randn(1, 11, 12, 32, requires_grad=True)
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    grads = torch.autograd.grad(out.sum(), (x, layer.rpb))
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.sum(), (x, layer.rpb))
    for g, w in zip([out, *grads], [ref, *ref_grads]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_auto_backend_is_reference_on_cpu():
    """``"reference"`` is always available, and ``"auto"`` picks it on CPU."""
    assert "reference" in available_backends()
    q, k, v = _qkv(1, (6, 7), heads=2, head_dim=4)
    assert torch.equal(na2d(q, k, v, 3, 2, backend="auto"), na2d(q, k, v, 3, 2, backend="reference"))


def test_whole_axis_kernel_is_global_attention():
    """With kernel_size equal to the spatial size (no dilation/stride) NA is plain self-attention."""
    q, k, v = _qkv(2, (5, 7), heads=2, head_dim=4)
    out = na2d(q, k, v, (5, 7))
    flat = [t.flatten(1, 2).transpose(1, 2) for t in (q, k, v)]  # [B, heads, N, D]
    expected = F.scaled_dot_product_attention(*flat).transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_kernel_size_one_returns_values():
    """kernel_size 1 makes every query attend only to itself: the output is v."""
    q, k, v = _qkv(2, (4, 5, 6), heads=2, head_dim=3)
    torch.testing.assert_close(na3d(q, k, v, 1, rpb=_rpb(2, (1, 1, 1))), v, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# 3. Hypothesis-drawn cases vs brute force.
# --------------------------------------------------------------------------------------------


@st.composite
def na_cases(draw):
    """``(spatial, kernel_size, dilation, stride, with_rpb, seed)``, kept small enough for the loops."""
    ndim = draw(st.integers(1, 3))
    max_span = {1: 15, 2: 9, 3: 5}[ndim]
    spatial, kernel, dilation, stride = [], [], [], []
    for _ in range(ndim):
        ks = draw(st.sampled_from([kk for kk in (1, 3, 5, 7) if kk <= max_span]))
        d = draw(st.integers(1, max_span // ks))
        kernel.append(ks)
        dilation.append(d)
        stride.append(draw(st.integers(1, ks)))
        spatial.append(ks * d + draw(st.integers(0, 4)))
    with_rpb, seed = draw(st.booleans()), draw(st.integers(0, 2**31 - 1))
    return tuple(spatial), tuple(kernel), tuple(dilation), tuple(stride), with_rpb, seed


@settings(max_examples=30, deadline=None)
@given(na_cases())
def test_random_cases_match_brute_force(case):
    """Random sizes (>= kernel_size * dilation), kernels, dilations and strides in 1-3 D match the
    brute force in float64."""
    spatial, kernel, dilation, stride, with_rpb, seed = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(1, spatial, heads=2, head_dim=3, generator=gen)
    rpb = _rpb(2, kernel, generator=gen) if with_rpb else None
    out = NA[len(spatial)](q, k, v, kernel, dilation, stride, rpb=rpb)
    torch.testing.assert_close(out, brute_force_na(q, k, v, kernel, dilation, stride, rpb=rpb), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# 4. Gradients.
# --------------------------------------------------------------------------------------------

# (spatial, kernel_size, dilation, stride)
GRADCHECK_CASES = [
    ((7, 4), 3, (2, 1), (1, 2)),
    ((9,), 3, 2, 2),
    ((4, 3, 7), 3, (1, 1, 2), (2, 1, 3)),
]


@pytest.mark.parametrize("spatial, kernel_size, dilation, stride", GRADCHECK_CASES)
def test_gradcheck(spatial, kernel_size, dilation, stride):
    """Analytic gradients of q, k, v and rpb match finite differences (float64)."""
    ndim = len(spatial)
    q, k, v = _qkv(1, spatial, heads=2, head_dim=2, v_dim=3)
    rpb = _rpb(2, _as_tuple(kernel_size, ndim))
    inputs = tuple(t.requires_grad_() for t in (q, k, v, rpb))
    fn = NA[ndim]
    assert torch.autograd.gradcheck(lambda q, k, v, rpb: fn(q, k, v, kernel_size, dilation, stride, rpb=rpb), inputs)


# --------------------------------------------------------------------------------------------
# 5. Strided views.
# --------------------------------------------------------------------------------------------


def test_fused_qkv_views_match_contiguous():
    """q, k, v as unbind views of a fused ``[B, H, W, 3, heads, D]`` tensor give the same output and
    the same gradients as contiguous copies."""
    qkv = torch.randn(2, 9, 10, 3, 4, 8, requires_grad=True)
    rpb = torch.randn(4, 9, 9)
    views = qkv.unbind(3)
    assert not any(t.is_contiguous() for t in views)
    out = na2d(*views, 5, (1, 2), (2, 1), rpb=rpb)
    (grad_views,) = torch.autograd.grad(out.square().sum(), qkv)

    copies = [t.detach().contiguous().requires_grad_() for t in views]
    expected = na2d(*copies, 5, (1, 2), (2, 1), rpb=rpb)
    grad_copies = torch.stack(torch.autograd.grad(expected.square().sum(), copies), dim=3)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_views, grad_copies, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 6. Half precision.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(dtype: torch.dtype, tol: float):
    """float16/bfloat16 inputs give outputs (and gradients) of the input dtype, close to float32."""
    q, k, v = (t.to(dtype).requires_grad_() for t in _qkv(1, (10, 11), heads=2, head_dim=8, dtype=torch.float32))
    rpb = torch.randn(2, 9, 9).to(dtype).requires_grad_()
    out = na2d(q, k, v, 5, 2, rpb=rpb)
    assert out.dtype == dtype
    expected = na2d(*(t.detach().float() for t in (q, k, v)), 5, 2, rpb=rpb.detach().float())
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    out.float().sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in (q, k, v, rpb))


# --------------------------------------------------------------------------------------------
# 7. Stride (and dilation) vs NATTEN >= 0.20 (forward, CPU, no rpb).
# --------------------------------------------------------------------------------------------


def _natten_forward(fn_name: str, q, k, v, kernel_size, dilation, stride) -> torch.Tensor:
    natten = pytest.importorskip("natten")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(natten, fn_name)(q, k, v, kernel_size=kernel_size, dilation=dilation, stride=stride)


# (H, W, kernel_size, dilation, stride)
NATTEN_2D_CASES = [
    (9, 11, 3, 1, 2),
    (10, 13, 3, 2, 3),
    (11, 7, 5, 1, 4),
    (13, 17, 3, 3, 2),
    (12, 12, 5, 2, 5),
    (15, 10, 5, 1, 3),
    (9, 9, 7, 1, 7),
    (17, 19, 3, (2, 3), (3, 2)),
    (14, 11, (5, 3), (2, 3), (5, 1)),
    # Even kernels (NATTEN >= 0.20 allows them): window attention and shifted windows.
    (32, 32, 16, 1, 16),
    (20, 23, 4, 2, 3),
    (21, 24, (2, 6), (3, 2), (2, 5)),
]


@pytest.mark.parametrize("H, W, kernel_size, dilation, stride", NATTEN_2D_CASES)
def test_na2d_stride_matches_natten(H, W, kernel_size, dilation, stride):
    """na2d with stride/dilation on ragged sizes equals natten.na2d."""
    q, k, v = _qkv(2, (H, W), heads=2, head_dim=8, dtype=torch.float32)
    expected = _natten_forward("na2d", q, k, v, kernel_size, dilation, stride)
    torch.testing.assert_close(na2d(q, k, v, kernel_size, dilation, stride), expected, rtol=0, atol=1e-5)


def test_na1d_stride_matches_natten():
    """na1d with stride and dilation on a ragged length equals natten.na1d."""
    q, k, v = _qkv(2, (23,), heads=2, head_dim=8, dtype=torch.float32)
    expected = _natten_forward("na1d", q, k, v, 5, 2, 3)
    torch.testing.assert_close(na1d(q, k, v, 5, 2, 3), expected, rtol=0, atol=1e-5)


def test_na3d_stride_matches_natten():
    """na3d with per-axis stride and dilation on ragged sizes equals natten.na3d."""
    q, k, v = _qkv(1, (7, 8, 9), heads=2, head_dim=8, dtype=torch.float32)
    args = ((3, 3, 3), (2, 1, 3), (2, 3, 1))
    expected = _natten_forward("na3d", q, k, v, *args)
    torch.testing.assert_close(na3d(q, k, v, *args), expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 8. Bad input.
# --------------------------------------------------------------------------------------------


def _unsqueeze3d(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return tuple(t[:, :, :, None] for t in tensors)


BAD_INPUTS = [
    pytest.param(
        lambda q, k, v: na2d(q[0], k[0], v[0], 3), r"q must be a 5-D tensor \[B, X, Y, heads, head_dim\]", id="rank"
    ),
    pytest.param(lambda q, k, v: na1d(q, k, v, 3), r"q must be a 4-D tensor", id="rank_1d"),
    pytest.param(lambda q, k, v: na2d(q, k[:, :9], v, 3), r"q and k must have the same shape", id="qk_shape"),
    pytest.param(
        lambda q, k, v: na2d(q, k, v[:, :, :11], 3), r"v must match k in every dim but head_dim", id="v_shape"
    ),
    pytest.param(lambda q, k, v: na2d(q, k, v, 0), r"kernel_size must be >= 1", id="zero_kernel"),
    pytest.param(
        lambda q, k, v: na2d(q, k, v, (3, -1)), r"kernel_size must be >= 1 .* got \(3, -1\)", id="negative_kernel_axis"
    ),
    pytest.param(
        lambda q, k, v: na2d(q, k, v, 5, 3),
        r"axis 0 has size 10, but kernel_size \* dilation = 5 \* 3 = 15",
        id="kernel_times_dilation_too_large",
    ),
    pytest.param(
        lambda q, k, v: na2d(q, k, v, 3, (1, 5)), r"axis 1 has size 12, .* = 15 is larger", id="dilated_axis_1"
    ),
    pytest.param(lambda q, k, v: na2d(q, k, v, 3, 0), r"dilation must be >= 1", id="dilation_zero"),
    pytest.param(
        lambda q, k, v: na2d(q, k, v, 3, rpb=torch.zeros(2, 3, 3)),
        r"rpb must have shape \[heads, 2k-1, \.\.\.\] = \(2, 5, 5\), got \(2, 3, 3\)",
        id="rpb_shape",
    ),
    pytest.param(
        lambda q, k, v: na2d(q, k, v, 3, rpb=torch.zeros(3, 5, 5)), r"rpb must have shape .* = \(2, 5, 5\)", id="rpb_heads"
    ),
    pytest.param(
        lambda q, k, v: na2d(q, k, v, 3, stride=4), r"stride must be in \[1, kernel_size\]", id="stride_gt_kernel"
    ),
    pytest.param(
        lambda q, k, v: na2d(q, k, v, 3, stride=(1, 0)), r"stride must be in \[1, kernel_size\]", id="stride_zero"
    ),
    pytest.param(
        lambda q, k, v: na2d(q, k, v, 3, backend="cuda_magic"),
        r"unknown backend 'cuda_magic'; expected 'auto' or one of \('reference'",
        id="unknown_backend",
    ),
    pytest.param(
        lambda q, k, v: na2d(q, k, v, (3, 3, 3)),
        r"kernel_size must be an int or a sequence of 2 ints",
        id="kernel_tuple_len",
    ),
    pytest.param(
        lambda q, k, v: na3d(*_unsqueeze3d(q, k, v), 1, (1, 1)),
        r"dilation must be an int or a sequence of 3 ints",
        id="dilation_tuple_len",
    ),
    pytest.param(lambda q, k, v: na2d(q, k.double(), v, 3), r"q, k, v must share one dtype", id="mixed_dtypes"),
    pytest.param(
        lambda q, k, v: na2d(q.long(), k.long(), v.long(), 3), r"must be floating point", id="integer_inputs"
    ),
    pytest.param(
        lambda q, k, v: na2d(q, k, v, (3.7, 3)), r"kernel_size must be an int or a sequence of 2 ints", id="float_kernel"
    ),
    pytest.param(lambda q, k, v: na2d(q, k, v, "33"), r"kernel_size must be an int", id="string_kernel"),
    pytest.param(lambda q, k, v: na2d(q, k, v, 3, dilation=(True, 1)), r"dilation must be an int", id="bool_dilation"),
    pytest.param(
        lambda q, k, v: na2d(q, k, v, 3, rpb=torch.zeros(2, 5, 5, dtype=torch.long)),
        r"rpb must be a floating-point tensor",
        id="integer_rpb",
    ),
]


@pytest.mark.parametrize("call, message", BAD_INPUTS)
def test_bad_input_raises_value_error(call, message: str):
    """Invalid arguments raise ValueError naming what was expected (and what was given)."""
    q, k, v = _qkv(1, (10, 12), heads=2, head_dim=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        call(q, k, v)


def test_validated_call_cache_never_admits_a_bad_variant():
    """A call validated once (and cached) does not make a bool, float or numpy variant of its
    arguments, or another shape, skip the checks."""
    import numpy as np

    q, k, v = _qkv(1, (10, 12), heads=2, head_dim=4, dtype=torch.float32)
    good = na2d(q, k, v, 3, dilation=1)
    for kwargs, message in [(dict(kernel_size=3, dilation=True), "dilation must be an int"),
                            (dict(kernel_size=3.0), "kernel_size must be an int"),
                            (dict(kernel_size=(3, True)), "kernel_size must be an int")]:
        with pytest.raises(ValueError, match=message):
            na2d(q, k, v, **kwargs)
    torch.testing.assert_close(na2d(q, k, v, np.int64(3), dilation=np.int64(1)), good)  # numpy ints: accepted
    with pytest.raises(ValueError, match="axis 1 has size 4"):
        na2d(q[:, :, :4], k[:, :, :4], v[:, :, :4], 3, dilation=2)


# --------------------------------------------------------------------------------------------
# 9. Slab splitting of the reference backend.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows_per_slab", [1, 3])
def test_slabs_match_unsplit(monkeypatch, rows_per_slab: int):
    """Splitting the queries into many slabs (the last one ragged) changes neither the output nor
    the gradients."""
    batch, (H, W), heads, dim, v_dim, kernel = 2, (10, 9), 2, 4, 5, (5, 3)
    q, k, v = _qkv(batch, (H, W), heads, dim, v_dim)
    rpb = _rpb(heads, kernel)
    inputs = [t.requires_grad_() for t in (q, k, v, rpb)]

    def run() -> Tuple[torch.Tensor, ...]:
        out = na2d(q, k, v, kernel, (1, 2), (2, 3), rpb=rpb)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        return (out,) + torch.autograd.grad((out * weights).sum(), inputs)

    unsplit = run()

    calls = []
    flat_index = reference._flat_index

    def counting_flat_index(*args):
        calls.append(args)
        return flat_index(*args)

    monkeypatch.setattr(reference, "_flat_index", counting_flat_index)
    monkeypatch.setattr(reference, "_SLAB_ELEMENTS", rows_per_slab * batch * W * math.prod(kernel) * heads * v_dim)
    split = run()

    assert len(calls) == 2 * math.ceil(H / rows_per_slab)  # key and rpb index per slab
    for got, expected in zip(split, unsplit):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_numpy_integers_are_accepted():
    import numpy as np

    q, k, v = (torch.randn(1, 9, 9, 2, 4) for _ in range(3))
    torch.testing.assert_close(na2d(q, k, v, np.int64(3), (np.int32(2), 1)), na2d(q, k, v, 3, (2, 1)))


def test_largest_intermediate_is_neighbourhood_sized():
    """The reference gathers k*k neighbours per query: no intermediate comes near N x N."""
    n, kernel = 48, 3
    q, k, v = (torch.randn(1, n, n, 1, 4) for _ in range(3))
    sizes = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                sizes.append(out.numel())
            return out

    with Watch():
        na2d(q, k, v, kernel)
    assert max(sizes) <= n * n * kernel**2 * 4 < (n * n) ** 2 / 10
