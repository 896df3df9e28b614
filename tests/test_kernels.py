"""The neighborhood-attention op layer against the official-semantics golden, an independent
brute-force loop, NATTEN (stride), autograd, and its input checks."""
import itertools
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import visattn.kernels as K
import visattn.kernels.reference as reference
from golden_data import load_golden

NA = {1: K.na1d, 2: K.na2d, 3: K.na3d}


def _window(p: int, length: int, k: int, d: int, s: int):
    """Key positions and rpb offsets of query ``p`` on one axis, straight from the definition."""
    g, i = p % d, p // d
    sub = [x for x in range(length) if x % d == g]
    leader = min((i // s) * s + s // 2, len(sub) - 1)
    start = min(max(leader - k // 2, 0), len(sub) - k)
    return [sub[start + t] for t in range(k)], [start + t - i + k - 1 for t in range(k)]


def brute_force(q, k, v, kernel, dilation, stride, rpb=None, scale=None):
    """Per-query loop over its window (float64), independent of the op's implementation."""
    ndim = q.dim() - 3
    spatial = q.shape[1 : 1 + ndim]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64)
    for pos in itertools.product(*(range(n) for n in spatial)):
        axes = [_window(p, n, kk, dd, ss) for p, n, kk, dd, ss in zip(pos, spatial, kernel, dilation, stride)]
        keys = list(itertools.product(*(a[0] for a in axes)))
        rels = list(itertools.product(*(a[1] for a in axes)))
        kk = torch.stack([k[(slice(None),) + key] for key in keys], 1).double()  # [B, n, heads, D]
        vv = torch.stack([v[(slice(None),) + key] for key in keys], 1).double()
        logits = torch.einsum("bhd,bnhd->bhn", q[(slice(None),) + pos].double() * scale, kk)
        if rpb is not None:
            logits = logits + torch.stack([rpb[(slice(None),) + r] for r in rels], -1).double()
        out[(slice(None),) + pos] = torch.einsum("bhn,bnhd->bhd", logits.softmax(-1), vv)
    return out


def _qkv(shape, dtype=torch.float64, requires_grad=False):
    return [torch.randn(shape, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def _tuple(x, ndim):
    return (x,) * ndim if isinstance(x, int) else tuple(x)


def test_golden_rpb_cases():
    """Op-level NATTEN 0.14 semantics with rpb, computed by the official-kernel port."""
    meta, _, io = load_golden("na2d_rpb_op")
    for case in meta["cases"]:
        i = case["case"]
        q, k, v, out = (io[f"case{i}.{n}"].permute(0, 2, 3, 1, 4) for n in ("q", "k", "v", "out"))
        got = K.na2d(q, k, v, case["kernel_size"], case["dilation"], rpb=io[f"case{i}.rpb"], scale=case["scale"])
        torch.testing.assert_close(got, out, rtol=0, atol=1e-5)


CASES = [
    # ndim, spatial, kernel, dilation, stride
    (1, (11,), 3, 1, 1),
    (1, (13,), 5, 2, 3),
    (1, (17,), 3, 4, 2),
    (2, (7, 9), 3, 1, 1),
    (2, (9, 11), (3, 5), (2, 1), (1, 2)),
    (2, (13, 10), 3, 3, 3),
    (2, (8, 8), 7, 1, 7),
    (3, (5, 6, 7), 3, 1, 1),
    (3, (6, 7, 9), (3, 3, 5), (2, 1, 1), (1, 3, 2)),
]


@pytest.mark.parametrize("ndim, spatial, kernel, dilation, stride", CASES)
@pytest.mark.parametrize("with_rpb", [False, True])
def test_reference_matches_brute_force(ndim, spatial, kernel, dilation, stride, with_rpb):
    heads, dim = 2, 4
    q, k, v = _qkv((2,) + spatial + (heads, dim))
    kt = _tuple(kernel, ndim)
    rpb = torch.randn((heads,) + tuple(2 * x - 1 for x in kt), dtype=torch.float64) if with_rpb else None
    got = NA[ndim](q, k, v, kernel, dilation, stride, rpb=rpb, scale=0.3)
    want = brute_force(q, k, v, kt, _tuple(dilation, ndim), _tuple(stride, ndim), rpb, scale=0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@st.composite
def _na2d_case(draw):
    axes = []
    for _ in range(2):
        k = draw(st.sampled_from([1, 3, 5, 7]))
        d = draw(st.integers(1, 4))
        s = draw(st.integers(1, k))
        n = draw(st.integers(k * d, k * d + 2 * d + 3))
        axes.append((n, k, d, s))
    return axes, draw(st.booleans())


@settings(max_examples=30, deadline=None)
@given(_na2d_case())
def test_random_cases_match_brute_force(case):
    axes, with_rpb = case
    spatial, kernel, dilation, stride = (tuple(a[i] for a in axes) for i in range(4))
    q, k, v = _qkv((1,) + spatial + (2, 3))
    rpb = torch.randn((2,) + tuple(2 * x - 1 for x in kernel), dtype=torch.float64) if with_rpb else None
    got = K.na2d(q, k, v, kernel, dilation, stride, rpb=rpb)
    torch.testing.assert_close(got, brute_force(q, k, v, kernel, dilation, stride, rpb), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "ndim, spatial, kernel, dilation, stride",
    [(1, (9,), 3, 2, 2), (2, (7, 8), 3, (2, 1), (1, 2)), (3, (4, 5, 6), 3, 1, (1, 1, 2))],
)
def test_gradcheck(ndim, spatial, kernel, dilation, stride):
    """Gradients of q, k, v and rpb, float64 finite differences."""
    q, k, v = _qkv((1,) + spatial + (2, 3), requires_grad=True)
    rpb = torch.randn((2,) + (2 * kernel - 1,) * ndim, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, rpb: NA[ndim](q, k, v, kernel, dilation, stride, rpb=rpb)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, rpb))


def test_strided_views_from_fused_qkv():
    """q, k, v sliced out of one qkv projection give the same result as contiguous copies."""
    qkv = torch.randn(2, 9, 10, 3, 4, 8)
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    rpb = torch.randn(4, 5, 5)
    torch.testing.assert_close(
        K.na2d(q, k, v, 3, 2, rpb=rpb), K.na2d(q.contiguous(), k.contiguous(), v.contiguous(), 3, 2, rpb=rpb)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v = _qkv((2, 12, 13, 2, 16), torch.float32)
    rpb = torch.randn(2, 9, 9)
    ref = K.na2d(q, k, v, 5, 2, rpb=rpb)
    out = K.na2d(q.to(dtype), k.to(dtype), v.to(dtype), 5, 2, rpb=rpb.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def test_slabs_match_unsplit(monkeypatch):
    """The memory-bounded slab loop (tiny budget: one query row per slab) changes nothing, forward or backward."""
    q, k, v = _qkv((1, 11, 9, 2, 4), requires_grad=True)
    rpb = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    whole = K.na2d(q, k, v, 3, (3, 2), rpb=rpb)
    grads = torch.autograd.grad(whole.square().sum(), (q, k, v, rpb))
    monkeypatch.setattr(reference, "_SLAB_ELEMENTS", 1)
    split = K.na2d(q, k, v, 3, (3, 2), rpb=rpb)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-12)
    for g_split, g in zip(torch.autograd.grad(split.square().sum(), (q, k, v, rpb)), grads):
        torch.testing.assert_close(g_split, g, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "ndim, spatial, kernel, dilation, stride",
    [
        (2, (9, 11), 3, 1, 2),
        (2, (14, 17), 5, 2, 3),
        (2, (20, 13), 5, 2, 5),
        (2, (12, 15), (3, 5), (3, 2), (2, 4)),
        (1, (23,), 5, 3, 4),
        (3, (7, 8, 9), 3, (1, 2, 1), (3, 1, 2)),
    ],
)
def test_stride_matches_natten(ndim, spatial, kernel, dilation, stride):
    """Generalized neighborhood attention (stride) as natten >= 0.20 defines it (no rpb there)."""
    natten = pytest.importorskip("natten")
    q, k, v = _qkv((1,) + spatial + (2, 8), torch.float32)
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[ndim]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = fn(q, k, v, kernel_size=kernel, dilation=dilation, stride=stride)
    torch.testing.assert_close(NA[ndim](q, k, v, kernel, dilation, stride), want, rtol=0, atol=2e-6)


def _args(**over):
    q, k, v = _qkv((1, 9, 9, 2, 4), torch.float32)
    args = dict(q=q, k=k, v=v, kernel_size=3, dilation=1, stride=1, rpb=None)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(q=torch.randn(1, 9, 2, 4)), r"q must be a 5-D tensor \[B, X, Y, heads, head_dim\]"),
        (dict(k=torch.randn(1, 9, 8, 2, 4)), r"q and k must have the same shape"),
        (dict(kernel_size=4), r"kernel_size must be odd"),
        (dict(kernel_size=5, dilation=2), r"axis 0 has size 9, but kernel_size \* dilation = 5 \* 2 = 10"),
        (dict(rpb=torch.randn(2, 3, 3)), r"rpb must have shape \[heads, 2k-1, \.\.\.\] = \(2, 5, 5\), got \(2, 3, 3\)"),
        (dict(stride=4), r"stride must be in \[1, kernel_size\]"),
        (dict(kernel_size=(3, 3, 3)), r"kernel_size must be an int or a sequence of 2 ints"),
        (dict(v=torch.randn(1, 9, 9, 2, 4, dtype=torch.float64)), r"must share one dtype"),
        (dict(dilation=0), r"dilation must be >= 1"),
    ],
    ids=["rank", "shape", "even-kernel", "too-small", "rpb-shape", "stride", "kernel-len", "dtype", "dilation"],
)
def test_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        K.na2d(**_args(**over))


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'cuda_magic'; expected 'auto' or one of \('reference',\)"):
        K.na2d(**_args(), backend="cuda_magic")


def test_memory_is_neighbourhood_sized():
    """The reference gathers k*k neighbours per query: its largest intermediate stays far below N x N."""
    n, kernel = 48, 3
    q, k, v = _qkv((1, n, n, 1, 4), torch.float32)
    sizes = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                sizes.append(out.numel())
            return out

    with Watch():
        K.na2d(q, k, v, kernel)
    assert max(sizes) <= n * n * kernel**2 * 4 < (n * n) ** 2 / 10
    assert math.prod(q.shape) <= max(sizes)
