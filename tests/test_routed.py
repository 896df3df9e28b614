"""The routed-attention ops (region-major and 2-D windows of a map): the references against dense
masked attention, deterministic routing, the Triton backend against the reference, and bad input."""
import pytest
import torch

import torch.nn.functional as F

from visattn.kernels import region_topk, region_topk_2d, routed_attention, routed_attention_2d


def _dense_masked(q, k, v, index, scale):
    """The same function as full attention over all tokens with a region mask (independent path)."""
    B, Rq, Tq, heads, D = q.shape
    Rk, Tk = k.shape[1], k.shape[2]
    allowed = torch.zeros(B, Rq, Rk, dtype=torch.bool)
    allowed.scatter_(2, index, True)
    mask = allowed[:, :, None, :, None].expand(B, Rq, Tq, Rk, Tk).reshape(B, 1, Rq * Tq, Rk * Tk)
    qf = q.reshape(B, Rq * Tq, heads, D).transpose(1, 2)
    kf = k.reshape(B, Rk * Tk, heads, D).transpose(1, 2)
    vf = v.reshape(B, Rk * Tk, heads, v.shape[-1]).transpose(1, 2)
    logits = (qf @ kf.transpose(-1, -2)) * scale
    out = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ vf
    return out.transpose(1, 2).reshape(B, Rq, Tq, heads, v.shape[-1])


@pytest.mark.parametrize("Rq, Rk, Tq, Tk, topk, D, Dv", [(9, 9, 4, 4, 3, 8, 8), (6, 10, 5, 3, 10, 16, 12), (4, 4, 1, 1, 1, 4, 4)])
def test_reference_matches_dense_masked_attention(Rq, Rk, Tq, Tk, topk, D, Dv):
    torch.manual_seed(0)
    q = torch.randn(2, Rq, Tq, 3, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Rk, Tk, 3, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Rk, Tk, 3, Dv, dtype=torch.float64, requires_grad=True)
    index = torch.stack([torch.randperm(Rk)[:topk] for _ in range(2 * Rq)]).view(2, Rq, topk)
    out = routed_attention(q, k, v, index, scale=0.3)
    ref = _dense_masked(q, k, v, index, 0.3)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, r)


def test_half_precision_is_computed_in_fp32():
    q, k, v = (torch.randn(1, 4, 4, 2, 8) for _ in range(3))
    index = region_topk(q.mean(2).flatten(2), k.mean(2).flatten(2), 2)
    out = routed_attention(q.half(), k.half(), v.half(), index)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), routed_attention(q, k, v, index), rtol=2e-3, atol=2e-3)


def test_region_topk_orders_and_breaks_ties_by_lower_index():
    q_desc = torch.tensor([[[1.0, 0.0]]])
    k_desc = torch.tensor([[[0.5, 0.0], [2.0, 0.0], [0.5, 1.0], [0.5, 0.0]]])
    assert region_topk(q_desc, k_desc, 3).tolist() == [[[1, 0, 2]]]  # 0, 2 and 3 tie: lower index first


def test_gather_backend_is_the_reference_in_the_input_dtype():
    """The benchmarks' baseline computes what the reference does; in half precision it stays in
    that dtype (its error is a half-precision one, larger than the reference's)."""
    q, k, v = (torch.randn(2, 6, 5, 2, 8) for _ in range(3))
    index = torch.stack([torch.randperm(6)[:3] for _ in range(12)]).view(2, 6, 3)
    exact = routed_attention(q.double(), k.double(), v.double(), index, backend="reference")
    torch.testing.assert_close(routed_attention(q, k, v, index, backend="gather"), exact.float(), rtol=1e-5, atol=1e-6)
    half = [t.bfloat16() for t in (q, k, v)]
    exact = routed_attention(*(t.double() for t in half), index, backend="reference")  # of the rounded inputs
    gather = routed_attention(*half, index, backend="gather")
    reference = routed_attention(*half, index, backend="reference")
    assert gather.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(gather.double(), exact, rtol=0.05, atol=0.05)
    assert (gather.double() - exact).norm() > (reference.double() - exact).norm()


@pytest.mark.parametrize("call, match", [
    (lambda q, k, v, i: routed_attention(q[0], k, v, i), r"q must be a 5-D tensor \[B, regions"),
    (lambda q, k, v, i: routed_attention(q, k, v[:, :3], i), r"k and v must agree"),
    (lambda q, k, v, i: routed_attention(q, k, v, i.int()), r"index must be int64 \[B, query_regions, topk\]"),
    (lambda q, k, v, i: routed_attention(q, k.double(), v, i), r"must share one floating dtype"),
    (lambda q, k, v, i: routed_attention(q, k, v, i, backend="cuda"), r"unknown backend .cuda."),
    (lambda q, k, v, i: region_topk(q.mean(2).flatten(2), k.mean(2).flatten(2), 5), r"topk must be in \[1, 4\]"),
])
def test_bad_input(call, match):
    q, k, v = (torch.randn(1, 4, 4, 2, 8) for _ in range(3))
    index = torch.zeros(1, 4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        call(q, k, v, index)


# --- the Triton backend (CPU through TRITON_INTERPRET=1, see conftest.py) ---------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_and_reference(q, k, v, index):
    """Output and (dq, dk, dv) of the Triton and the reference backends, for one random dO."""
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad = torch.randn(q.shape, device=q.device)
    results = []
    for backend in ("triton", "reference"):
        out = routed_attention(q, k, v, index, 0.3, backend=backend)
        results.append([out, *torch.autograd.grad(out, (q, k, v), grad)])
    return results


@pytest.mark.parametrize("B, Rq, Rk, Tq, Tk, topk, heads, D", [
    (2, 9, 9, 4, 4, 3, 2, 16),      # BiFormer stage 3 at 112 px (2x2 regions)
    (1, 6, 10, 40, 33, 4, 2, 24),   # ragged: partial query / key tiles, 132 packed keys, Rq != Rk, head_dim 24
    (2, 4, 4, 1, 1, 1, 1, 16),      # one-token regions
], ids=["regions2x2", "ragged", "single-token"])
def test_triton_matches_reference(B, Rq, Rk, Tq, Tk, topk, heads, D):
    q = torch.randn(B, Rq, Tq, heads, D, device=DEVICE)
    k, v = (torch.randn(B, Rk, Tk, heads, D, device=DEVICE) for _ in range(2))
    index = torch.stack([torch.randperm(Rk)[:topk] for _ in range(B * Rq)]).view(B, Rq, topk).to(DEVICE)
    got, want = _triton_and_reference(q, k, v, index)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Rq, Rk, Tq, Tk, topk, repeats", [
    (5, 6, 4, 4, 5, False),    # 20 packed keys from 5 regions: one partial step
    (4, 7, 3, 5, 3, False),    # Tq != Tk, Rq != Rk
    (6, 4, 5, 1, 3, False),    # one-token key regions
    (3, 17, 2, 5, 15, False),  # 75 packed keys: two steps of 64, one region split between them
    (8, 3, 5, 4, 4, True),     # repeated picks, key region 2 never picked; ~80 packed queries per picked region
], ids=["packed-partial", "tq-ne-tk", "single-token-keys", "several-key-steps", "repeats-unrouted"])
def test_triton_packed_walks_match_reference(Rq, Rk, Tq, Tk, topk, repeats):
    """Both packed walks (routed keys for out / dq, routing queries for dk / dv) across region boundaries."""
    q = torch.randn(1, Rq, Tq, 2, 16, device=DEVICE)
    k, v = (torch.randn(1, Rk, Tk, 2, 16, device=DEVICE) for _ in range(2))
    if repeats:  # 4 picks among 2 regions: every row repeats one
        index = torch.randint(0, Rk - 1, (1, Rq, topk), device=DEVICE)
    else:
        index = torch.stack([torch.randperm(Rk)[:topk] for _ in range(Rq)]).view(1, Rq, topk).to(DEVICE)
    got, want = _triton_and_reference(q, k, v, index)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    if repeats:
        assert not got[2][:, -1].any() and not got[3][:, -1].any(), "an unpicked key region has nonzero dk / dv"


def test_triton_strided_views_and_fp16():
    """q, k, v sliced from one projection (as BiFormer makes them), in fp16."""
    qkv = torch.randn(1, 4, 9, 3, 2, 16, device=DEVICE, dtype=torch.float16, requires_grad=True)
    q, k, v = qkv.unbind(3)
    index = torch.tensor([[[0, 3], [1, 2], [2, 2], [3, 0]]], device=DEVICE)  # a repeated region counts twice
    grad = torch.randn(1, 4, 9, 2, 16, device=DEVICE, dtype=torch.float16)
    got = routed_attention(q, k, v, index, backend="triton")
    (dqkv,) = torch.autograd.grad(got, qkv, grad)
    ref_in = qkv.detach().float().requires_grad_()
    want = routed_attention(*ref_in.unbind(3), index, backend="reference")
    (ref_dqkv,) = torch.autograd.grad(want, ref_in, grad.float())
    assert got.dtype == dqkv.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(dqkv.float(), ref_dqkv, rtol=1e-2, atol=1e-2)


def test_index_out_of_range_is_refused():
    q, k, v = (torch.randn(1, 4, 4, 2, 8) for _ in range(3))
    with pytest.raises(ValueError, match=r"index must hold key-region numbers in \[0, 4\), got values in \[0, 4\]"):
        routed_attention(q, k, v, torch.tensor([[[0], [1], [4], [2]]]), backend="triton")


def test_triton_unsupported_raises():
    q, k = (torch.randn(1, 4, 4, 2, 8, device=DEVICE) for _ in range(2))
    index = torch.zeros(1, 4, 1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=r"does not support v head_dim 4 != q head_dim 8"):
        routed_attention(q, k, torch.randn(1, 4, 4, 2, 4, device=DEVICE), index, backend="triton")
    with pytest.raises(ValueError, match=r"does not support dtype torch.float64"):
        routed_attention(q.double(), k.double(), k.double(), index, backend="triton")


def test_triton_under_torch_compile_fullgraph():
    """Under torch.compile the fused op is a custom op with a fake implementation: one graph."""
    q, k, v = (torch.randn(1, 4, 9, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    index = torch.tensor([[[0, 3], [1, 2], [2, 0], [3, 1]]], device=DEVICE)
    fn = torch.compile(lambda q, k, v: routed_attention(q, k, v, index, backend="triton"), fullgraph=True,
                       backend="aot_eager")
    out = fn(q, k, v)
    ref = routed_attention(q, k, v, index, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# --- routed_attention_2d: the windows of a [B, H, W, heads, D] map are the regions ---------------

def _dense_masked_2d(q, k, v, index, grid, scale):
    """Full attention over the map's tokens, masked to the routed windows (an independent path)."""
    B, H, W, heads, D = q.shape
    nh, nw = grid
    window = (torch.arange(H)[:, None] // (H // nh)) * nw + torch.arange(W)[None, :] // (W // nw)  # [H, W]
    window = window.reshape(-1)
    allowed = torch.zeros(B, nh * nw, nh * nw, dtype=torch.bool).scatter_(2, index.cpu(), True)
    mask = allowed[:, window][:, :, window].to(q.device)  # [B, HW, HW]: query token's window routed the key's
    qf, kf, vf = (t.reshape(B, H * W, heads, -1).transpose(1, 2) for t in (q, k, v))
    logits = (qf @ kf.transpose(-1, -2)) * scale
    out = logits.masked_fill(~mask[:, None], float("-inf")).softmax(-1) @ vf
    return out.transpose(1, 2).reshape(B, H, W, heads, v.shape[-1])


def _routing(B, regions, topk, device=DEVICE):
    return torch.stack([torch.randperm(regions)[:topk] for _ in range(B * regions)]).view(B, regions, topk).to(device)


@pytest.mark.parametrize("H, W, grid, topk", [(6, 10, (2, 5), 3), (9, 6, (3, 2), 6), (4, 4, 1, 1)])
def test_2d_reference_matches_dense_masked_attention(H, W, grid, topk):
    q, k = (torch.randn(2, H, W, 2, 8, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, H, W, 2, 5, dtype=torch.float64)
    nh, nw = (grid, grid) if isinstance(grid, int) else grid
    index = _routing(2, nh * nw, topk, "cpu")
    got = routed_attention_2d(q, k, v, index, grid, 0.4, backend="reference")
    torch.testing.assert_close(got, _dense_masked_2d(q, k, v, index, (nh, nw), 0.4))
    torch.testing.assert_close(routed_attention_2d(q, k, v, index, grid, 0.4, backend="gather"), got)


@pytest.mark.parametrize("H, W, grid, topk, heads, D", [
    (8, 8, (2, 2), 2, 2, 16),     # square windows of 16 tokens
    (9, 10, (3, 2), 4, 2, 24),    # 3x5 windows (ragged tiles), Rq = 6, head_dim 24
    (12, 14, (2, 7), 9, 1, 16),   # 6x2 windows, 108 packed keys over two steps
], ids=["square", "ragged", "two-steps"])
def test_2d_triton_matches_reference_on_qkv_slices(H, W, grid, topk, heads, D):
    """Forward and every gradient, q / k / v sliced from one projection map (as BiFormer has them)."""
    qkv = torch.randn(2, H, W, 3 * heads * D, device=DEVICE, requires_grad=True)
    index = _routing(2, grid[0] * grid[1], topk)
    grad = torch.randn(2, H, W, heads, D, device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        q, k, v = (t.unflatten(-1, (heads, D)) for t in qkv.split(heads * D, dim=-1))
        out = routed_attention_2d(q, k, v, index, grid, 0.3, backend=backend)
        results.append((out, *torch.autograd.grad(out, qkv, grad)))
    for name, g, w in zip(["out", "dqkv"], *results):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_triton_dkdv_walk_with_one_popular_region():
    """Every query region picks key region 2 (as at random init, when routing is most uneven):
    that key region's program walks all twelve query regions."""
    q, k, v = (torch.randn(1, 12, 4, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    index = torch.stack([torch.tensor([2, r % 12]) if r % 12 != 2 else torch.tensor([2, 5]) for r in range(12)])[None]
    got, want = _triton_and_reference(q, k, v, index.to(DEVICE))
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _distinct_dkdv_candidates():
    from visattn.kernels import triton_routed

    tiles = triton_routed._tiles(12, 20, 3, 16)  # the case below: 12-token query regions, 20-token key regions
    return list(dict.fromkeys(triton_routed._dkdv_candidates(tiles)))


@pytest.mark.parametrize("config", _distinct_dkdv_candidates(), ids=str)
def test_triton_every_dkdv_candidate_matches_reference(monkeypatch, config):
    """The GPU tuner may pick any dK / dV launch candidate: each one (longer query steps than a
    region, partial key tiles, one popular key region) gives the reference's gradients."""
    from visattn.kernels import triton_routed
    from visattn.kernels._triton_common import CallCache

    monkeypatch.setattr(triton_routed, "_dkdv_candidates", lambda tiles: [config])
    monkeypatch.setattr(triton_routed, "_CALLS", CallCache())
    q = torch.randn(1, 9, 12, 2, 16, device=DEVICE)
    k, v = (torch.randn(1, 5, 20, 2, 16, device=DEVICE) for _ in range(2))
    index = torch.stack([torch.tensor([3, r % 5, (r + 2) % 5]) for r in range(9)])[None].to(DEVICE)
    got, want = _triton_and_reference(q, k, v, index)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_2d_triton_repeated_and_unrouted_windows():
    """A window picked twice counts twice; a window nobody picked gets zero dk / dv."""
    q, k, v = (torch.randn(1, 6, 6, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    index = torch.randint(0, 3, (1, 4, 3), device=DEVICE)  # windows 0..2 of 4, repeats likely
    index[0, 0] = torch.tensor([1, 1, 0])
    got = routed_attention_2d(q, k, v, index, 2, backend="triton")
    want = routed_attention_2d(q, k, v, index, 2, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(got)
    g_t, g_r = (torch.autograd.grad(o, (q, k, v), grad) for o in (got, want))
    for g, w in zip(g_t, g_r):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert not g_t[1][:, 3:, 3:].any() and not g_t[2][:, 3:, 3:].any(), "window 3 was never routed"


def test_2d_triton_under_torch_compile_fullgraph():
    q, k, v = (torch.randn(1, 4, 6, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    index = _routing(1, 4, 2)
    fn = torch.compile(lambda q, k, v: routed_attention_2d(q, k, v, index, (2, 2), backend="triton"),
                       fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    ref = routed_attention_2d(q, k, v, index, (2, 2), backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_bra_layer_compiles_fullgraph():
    """The BiFormer layer (routing, routed attention on the qkv slices, LePE, auto_pad) traces into
    one graph; output and input gradient equal the eager layer's."""
    from visattn.layers import BiLevelRoutingAttention

    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(32, 2, n_win=2, qk_dim=32, topk=2, auto_pad=True, backend="triton").to(DEVICE)
    x = torch.randn(1, 7, 8, 32, device=DEVICE, requires_grad=True)
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    ref = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0],
                               rtol=1e-5, atol=1e-5)


# --- region_topk_2d: BiFormer's routing from the maps ---------------------------------------------

def _pooled_routing(q, k, grid, topk, scale):
    """Window means by average pooling and a stable descending sort (an independent path)."""
    nh, nw = grid
    H, W = q.shape[1:3]
    q_desc, k_desc = (F.avg_pool2d(t.permute(0, 3, 1, 2), (H // nh, W // nw)).flatten(2).transpose(1, 2)
                      for t in (q, k))
    logits = (q_desc * scale) @ k_desc.transpose(1, 2)
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :topk]


@pytest.mark.parametrize("H, W, grid, topk, C", [
    (8, 8, (2, 2), 4, 16),      # every window routed
    (9, 10, (3, 2), 2, 24),     # 3x5 windows, C not a power of two
    (14, 14, (7, 7), 16, 8),    # BiFormer's 7x7 grid of 2x2 windows (stage 3), C < 16
    (4, 6, (1, 3), 1, 40),      # one row of windows, top-1
])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_region_topk_2d_matches_pooled_routing(H, W, grid, topk, C, backend):
    """Both backends against pooling + sort, on q / k sliced from one projection map (fp32)."""
    torch.manual_seed(0)
    qkv = torch.randn(2, H, W, 3 * C, device=DEVICE)
    q, k = qkv[..., :C], qkv[..., C:2 * C]
    want = _pooled_routing(q.cpu(), k.cpu(), grid, topk, 0.25)
    got = region_topk_2d(q, k, grid, topk, 0.25, backend=backend)
    assert got.dtype == torch.int64 and got.shape == (2, grid[0] * grid[1], topk)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_region_topk_2d_ties_keep_the_lower_window(backend):
    """Windows 1 and 3 of k are copies of window 0 (equal logits for every query window): they come
    in window order; the triton backend ranks them as the reference does."""
    torch.manual_seed(1)
    q = torch.randn(1, 4, 4, 16, device=DEVICE)
    k = torch.randn(1, 4, 4, 16, device=DEVICE)
    k[:, :2, 2:] = k[:, :2, :2]  # window 1 = window 0
    k[:, 2:, 2:] = k[:, :2, :2]  # window 3 = window 0
    got = region_topk_2d(q, k, 2, 4, backend=backend).cpu()
    for row in got[0].tolist():
        tied = [w for w in row if w in (0, 1, 3)]
        assert tied == [0, 1, 3], row
    assert torch.equal(got, _pooled_routing(q.cpu(), k.cpu(), (2, 2), 4, 1.0))


def test_region_topk_2d_triton_in_half_precision_ranks_by_fp32_logits():
    """In bf16 the triton backend's means and logits are fp32: its picks are the fp32 ranking of
    the bf16 inputs."""
    torch.manual_seed(2)
    q, k = (torch.randn(2, 12, 12, 32, device=DEVICE).bfloat16() for _ in range(2))
    got = region_topk_2d(q, k, 3, 3, 0.5, backend="triton")
    assert torch.equal(got.cpu(), _pooled_routing(q.float().cpu(), k.float().cpu(), (3, 3), 3, 0.5))


def test_invert_routing_lists_the_query_windows_of_every_key_window():
    """The backward's CSR of the routing (one Triton launch) against a loop: repeats listed twice,
    unrouted key regions empty, query regions in increasing order."""
    from visattn.kernels.triton_routed import _invert_routing

    torch.manual_seed(3)
    index = torch.randint(0, 5, (3, 7, 4))
    index[0, 2] = torch.tensor([1, 1, 1, 4])
    offsets, regions = _invert_routing(index.to(DEVICE), 6)
    assert offsets.dtype == regions.dtype == torch.int32
    for b in range(3):
        want = [[r for r in range(7) for slot in range(4) if index[b, r, slot] == key] for key in range(6)]
        counts = [len(w) for w in want]
        assert offsets[b].tolist() == [sum(counts[:i]) for i in range(7)]
        assert regions[b].tolist() == [r for w in want for r in w]


@pytest.mark.parametrize("call, match", [
    (lambda q, k: region_topk_2d(q, k[:, :2], 2, 1), r"q and k must be \[B, H, W, C\] maps of one shape"),
    (lambda q, k: region_topk_2d(q[0], k[0], 2, 1), r"q and k must be \[B, H, W, C\] maps"),
    (lambda q, k: region_topk_2d(q, k, 3, 1), r"the 4x6 map must divide into region_grid 3x3"),
    (lambda q, k: region_topk_2d(q, k, 2, 5), r"topk must be in \[1, 4\] \(the number of windows\), got 5"),
    (lambda q, k: region_topk_2d(q, k, 2, 1, backend="cuda"), r"unknown backend 'cuda'"),
    (lambda q, k: region_topk_2d(q.double(), k.double(), 2, 1, backend="triton"), r"float64"),
])
def test_region_topk_2d_bad_input(call, match):
    q, k = (torch.randn(1, 4, 6, 8) for _ in range(2))
    with pytest.raises(ValueError, match=match):
        call(q, k)


@pytest.mark.parametrize("call, match", [
    (lambda q, k, v, i: routed_attention_2d(q[0], k, v, i, 2), r"q must be a 5-D tensor \[B, H, W, heads"),
    (lambda q, k, v, i: routed_attention_2d(q, k, v, i, 3), r"the 4x6 map must divide into region_grid 3x3"),
    (lambda q, k, v, i: routed_attention_2d(q, k, v, i, (2, 0)), r"region_grid 2x0"),
    (lambda q, k, v, i: routed_attention_2d(q, k, v, i, "2"), r"region_grid must be an int or a pair of ints"),
    (lambda q, k, v, i: routed_attention_2d(q, k, v, i, (1, 2)), r"index must be int64 \[B, query_regions, topk\] = \[1, 2, topk\]"),
    (lambda q, k, v, i: routed_attention_2d(q, k[:, :2], v[:, :2], i, 2), r"k and v must be maps of q's size \(4, 6\)"),
    (lambda q, k, v, i: routed_attention_2d(q, k, v, i + 4, 2), r"index must hold key-region numbers in \[0, 4\)"),
])
def test_2d_bad_input(call, match):
    q, k, v = (torch.randn(1, 4, 6, 2, 8) for _ in range(3))
    index = torch.zeros(1, 4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        call(q, k, v, index)
