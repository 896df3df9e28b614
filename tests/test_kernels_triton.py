"""The Triton NA backend against the reference (on CPU through TRITON_INTERPRET=1, see conftest.py).

Forward and backward (q, k, v and rpb gradients) on ragged sizes for 1-D, 2-D and 3-D calls, with
dilation (to 32), stride, per-axis parameters (kernels to 13), even kernels, custom scales, both
key-row step sizes and both reductions of the rpb gradient; strided views; the torch.compile path;
unsupported calls.
"""
import pytest
import torch

from visattn.kernels import available_backends, na1d, na2d, na3d
from visattn.kernels import triton_na
from visattn.kernels._triton_common import CallCache, KernelCall
from visattn.kernels.reference import neighborhood_index
from visattn.kernels.triton_na import LaunchConfig

# CUDA when there is one; otherwise CPU through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FN = {1: na1d, 2: na2d, 3: na3d}

CASES = [
    # spatial, kernel, dilation, stride, rpb, head_dim
    pytest.param((9, 11), 3, 1, 1, True, 16, id="2d-k3"),
    pytest.param((14, 17), 5, 2, 3, True, 16, id="2d-dil2-stride3"),
    pytest.param((20, 13), 3, 3, 2, False, 32, id="2d-no-rpb"),
    pytest.param((12, 12), 7, 1, 7, True, 16, id="2d-window7"),
    pytest.param((16, 20), 8, 1, 8, True, 16, id="2d-window8-tiles-inside"),
    pytest.param((16, 19), (3, 5), (2, 1), (1, 2), True, 24, id="2d-per-axis-d24"),
    pytest.param((12, 13), 4, 1, 4, True, 16, id="2d-even-window4"),
    pytest.param((11, 10), (2, 6), (1, 1), (1, 3), True, 16, id="2d-even-per-axis"),
    pytest.param((23,), 5, 2, 3, True, 16, id="1d"),
    pytest.param((40,), 7, 1, 1, False, 32, id="1d-no-rpb"),
    pytest.param((5, 6, 7), 3, (1, 2, 1), (1, 1, 2), True, 16, id="3d"),
    pytest.param((6, 5, 9), (3, 3, 5), 1, (3, 1, 1), False, 16, id="3d-no-rpb"),
]


def _inputs(spatial, kernel, head_dim, with_rpb, dtype=torch.float32, heads=2, batch=2):
    ks = (kernel,) * len(spatial) if isinstance(kernel, int) else kernel
    q, k, v = (torch.randn(batch, *spatial, heads, head_dim, dtype=dtype, device=DEVICE, requires_grad=True)
               for _ in range(3))
    rpb = (torch.randn(heads, *(2 * x - 1 for x in ks), dtype=dtype, device=DEVICE, requires_grad=True)
           if with_rpb else None)
    return q, k, v, rpb


def _fwd_bwd(fn, q, k, v, rpb, grad, backend, *args, **kwargs):
    inputs = [q, k, v] + ([rpb] if rpb is not None else [])
    out = fn(q, k, v, *args, rpb=rpb, backend=backend, **kwargs)
    return [out] + list(torch.autograd.grad(out, inputs, grad))


def _assert_triton_matches_reference(fn, q, k, v, rpb, *args, **kwargs):
    """The triton backend's output and q / k / v / rpb gradients equal the reference's (fp32)."""
    grad = torch.randn(q.shape, device=DEVICE)
    got = _fwd_bwd(fn, q, k, v, rpb, grad, "triton", *args, **kwargs)
    want = _fwd_bwd(fn, q, k, v, rpb, grad, "reference", *args, **kwargs)
    for name, g, w in zip(["out", "dq", "dk", "dv", "drpb"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_registered():
    assert "triton" in available_backends()


@pytest.mark.parametrize("spatial, kernel, dilation, stride, with_rpb, head_dim", CASES)
def test_forward_backward_match_reference(spatial, kernel, dilation, stride, with_rpb, head_dim):
    fn = FN[len(spatial)]
    q, k, v, rpb = _inputs(spatial, kernel, head_dim, with_rpb)
    _assert_triton_matches_reference(fn, q, k, v, rpb, kernel, dilation, stride)


@pytest.mark.parametrize("spatial, kernel, dilation", [
    pytest.param((13, 14), (13, 3), 1, id="2d-k13-per-axis"),
    pytest.param((99,), 3, 32, id="1d-dilation32"),
])
def test_largest_kernel_and_dilation(spatial, kernel, dilation):
    """The ends of the supported ranges (kernel 13, dilation 32), on one batch and head: the
    interpreter's time grows with the programs, one per tile, head and dilation group."""
    fn = FN[len(spatial)]
    q, k, v, rpb = _inputs(spatial, kernel, 16, True, heads=1, batch=1)
    _assert_triton_matches_reference(fn, q, k, v, rpb, kernel, dilation)


@pytest.mark.parametrize("config", [
    LaunchConfig((1, 8, 8), 1, 4, 2),  # single key rows: rpb gradient by per-element atomics
    LaunchConfig((1, 4, 8), 2, 4, 2),  # 8 reduced rows: < 16, so per-element atomics too
    LaunchConfig((1, 8, 16), 2, 4, 2),  # one-hot matmul reduction, wide tiles
], ids=["rows1", "rows2-small-tile", "rows2-wide"])
@pytest.mark.parametrize("rpb_tile", [True, False], ids=["rpb-register-tile", "rpb-step-atomics"])
def test_launch_configs_agree(monkeypatch, config, rpb_tile):
    """Every tuning candidate computes the same function (tiles, key rows per step, rpb reductions:
    the register tile of the gradient, or per-step atomic partial sums where it would not fit)."""
    monkeypatch.setattr(triton_na, "_candidates", lambda kind, rank: [config])
    monkeypatch.setattr(triton_na, "_CALLS", CallCache())  # no launch cached by another case
    if not rpb_tile:
        monkeypatch.setattr(triton_na, "_RPB_ACC_MAX", 0)
    q, k, v, rpb = _inputs((18, 21), 5, 16, True)
    _assert_triton_matches_reference(na2d, q, k, v, rpb, 5, (2, 1), (1, 2))


def _distinct_candidates():
    # Warps and stages do not change the interpreter's result: one case per (kernel, rank, tile,
    # rows, window tables).
    seen = {}
    for kind, by_rank in triton_na._CANDIDATES.items():
        for rank, configs in by_rank.items():
            for config in configs:
                seen.setdefault((kind, rank, config.tile, config.rows, config.table), config)
    return [pytest.param(kind, rank, config,
                         id=f"{kind}-{rank}d-{'x'.join(map(str, tile))}-r{rows}{'-table' if table else ''}")
            for (kind, rank, tile, rows, table), config in seen.items()]


# (spatial, kernel, dilation, stride) per rank: ragged against every candidate tile.
_CANDIDATE_CASES = {1: ((37,), 5, 2, 1), 2: ((11, 13), 5, (2, 1), (1, 2)), 3: ((3, 5, 9), 3, 1, (1, 1, 2))}


@pytest.mark.parametrize("kind, rank, config", _distinct_candidates())
def test_every_tuning_candidate_matches_reference(monkeypatch, kind, rank, config):
    """The GPU tuner may pick any candidate of any kernel: each one (the others at their
    defaults) computes the reference's outputs and gradients."""
    monkeypatch.setattr(triton_na, "_candidates",
                        lambda k, r: [config] if k == kind else [triton_na._CANDIDATES[k][r][0]])
    monkeypatch.setattr(triton_na, "_CALLS", CallCache())
    spatial, kernel, dilation, stride = _CANDIDATE_CASES[rank]
    q, k, v, rpb = _inputs(spatial, kernel, 16, True)
    _assert_triton_matches_reference(FN[rank], q, k, v, rpb, kernel, dilation, stride)


WINDOW_TABLE_CASES = [
    # rank, spatial, kernel, dilation, stride, tile: ragged tiles and maps, dilation groups of
    # different lengths, strides whose groups cut tiles, windows
    pytest.param(1, (37,), 5, 3, 2, (1, 1, 64), id="1d-dil3-stride2"),
    pytest.param(2, (13, 11), 3, 1, 1, (1, 4, 8), id="2d-k3"),
    pytest.param(2, (17, 19), 5, 2, 1, (1, 4, 8), id="2d-dil2-ragged-groups"),
    pytest.param(2, (16, 16), 7, 1, 7, (1, 4, 8), id="2d-window7"),
    pytest.param(2, (14, 17), (3, 5), (2, 1), (1, 2), (1, 8, 8), id="2d-per-axis"),
    pytest.param(2, (15, 12), 5, 1, 1, (1, 2, 8), id="2d-16-query-tiles"),
    pytest.param(3, (5, 9, 10), 3, (1, 2, 1), (2, 1, 1), (2, 4, 8), id="3d"),
]


@pytest.mark.parametrize("rank, spatial, kernel, dilation, stride, tile", WINDOW_TABLE_CASES)
@pytest.mark.parametrize("dtypes", ["fp32", "fp16 q, fp32 rpb", "fp16"])
def test_window_tables_match_reference(monkeypatch, rank, spatial, kernel, dilation, stride, tile, dtypes):
    """The forward reading its windows from per-tile-class tables (any rank), with and without
    rpb: the reference's outputs, also with an fp32 rpb split into two fp16 parts. And where the
    tables would be too large the kernel computes the windows instead (same outputs)."""
    table = LaunchConfig(tile, 2 if rank > 1 else 1, 2, 2, table=True)
    monkeypatch.setattr(triton_na, "_candidates",
                        lambda k, r: [table] if k == "fwd" else [triton_na._CANDIDATES[k][r][0]])
    q_dtype = torch.float32 if dtypes == "fp32" else torch.float16
    rpb_dtype = torch.float16 if dtypes == "fp16" else torch.float32
    q, k, v, rpb = (t.detach() for t in _inputs(spatial, kernel, 16, True))
    q, k, v, rpb = q.to(q_dtype), k.to(q_dtype), v.to(q_dtype), rpb.to(rpb_dtype)
    tol = dict(rtol=1e-5, atol=2e-5) if q_dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for table_max in (triton_na._TABLE_MAX, 0):
        monkeypatch.setattr(triton_na, "_TABLE_MAX", table_max)
        monkeypatch.setattr(triton_na, "_CALLS", CallCache())
        for bias in (rpb, None):
            got = FN[rank](q, k, v, kernel, dilation, stride, rpb=bias, backend="triton")
            want = FN[rank](q.double(), k.double(), v.double(), kernel, dilation, stride,
                            rpb=None if bias is None else bias.double(), backend="reference")
            torch.testing.assert_close(got.double(), want, **tol)
        launches = list(triton_na._CALLS.entries.values())
        assert all((launch.classes is not None) == (table_max > 0) for launch in launches)  # tables where they fit


def test_window_table_splits_an_rpb_of_another_dtype():
    """An fp32 rpb beside fp16 q is written as two fp16 parts whose sum keeps 16 bits of its
    mantissa (error <= 2^-17 relative; one fp16 part alone rounds at 2^-11), and masked entries are
    the finite masked value in the first part and 0 in the second."""
    q = torch.zeros(1, 12, 12, 2, 16, dtype=torch.float16, device=DEVICE)
    rpb = torch.randn(2, 7, 7, device=DEVICE)
    params = triton_na._params(q, (4, 4), (1, 1), (1, 1), 0.25)
    key = triton_na._call_key("fwd", params, q, rpb)
    launch = triton_na._ForwardLaunch(key, LaunchConfig((1, 4, 8), 2, 2, 2, table=True))
    assert launch.split == 2
    table = torch.empty((2, 2 * launch.table_elements), dtype=torch.float16, device=DEVICE)
    launch.expand(rpb, launch.index, table)
    step = launch.expand.meta["STEP"]  # one step's [TQ, ROWS * BLOCK_KW] entries
    parts = table.view(2, -1, 2, step).float()
    index = launch.index.view(-1, step)
    valid = index >= 0
    want = rpb.reshape(2, -1)[:, index.clamp(min=0)]
    total = parts[:, :, 0] + parts[:, :, 1]
    err = ((total - want).abs() / want.abs().clamp(min=1e-3))[:, valid]
    assert err.max() <= 2.0 ** -17
    assert ((parts[:, :, 0] - want).abs() / want.abs().clamp(min=1e-3))[:, valid].max() > 2.0 ** -14
    assert (parts[:, :, 0][:, ~valid] == triton_na._MASKED[torch.float16]).all()
    assert (parts[:, :, 1][:, ~valid] == 0).all()


@pytest.mark.parametrize("length, kernel, dilation, stride, tile", [
    (56, 7, 1, 1, 8), (56, 7, 8, 1, 4), (64, 16, 1, 16, 4), (64, 16, 1, 16, 16), (12, 7, 1, 7, 8),
    (23, 5, 2, 3, 8), (13, 4, 1, 4, 2), (30, 9, 1, 4, 8),
])
def test_axis_extents_match_the_windows(length, kernel, dilation, stride, tile):
    """The kernels' per-axis halo and reach are the exact extents of the reference's windows: over
    every tile of sub-grid positions, the keys its queries see and the queries that see its keys."""
    keys = neighborhood_index(length, kernel, dilation, stride, torch.device("cpu"))[0]
    halo = reach = 0
    for group in range(dilation):
        positions = list(range(group, length, dilation))
        for t0 in range(0, len(positions), tile):
            tile_pos = positions[t0:t0 + tile]
            seen = keys[tile_pos].flatten()
            halo = max(halo, int(seen.max() - seen.min()) // dilation + 1)
            reach = max(reach, int(torch.isin(keys[positions], torch.tensor(tile_pos)).any(1).sum()))
    assert triton_na._axis_extents(length, kernel, dilation, stride, tile) == (halo, reach)


def test_window_attention_walks_one_window():
    """Window attention (stride == kernel) with tiles inside one window: the walk covers exactly
    the window, not the strided worst case of tile + kernel + stride - 2 positions."""
    assert triton_na._axis_extents(64, 16, 1, 16, 8) == (16, 16)
    assert triton_na._axis_extents(56, 7, 1, 1, 8) == (14, 14)


def test_strided_views_and_mixed_layouts():
    """q, k, v sliced from a fused qkv (shared strides), a contiguous k beside them (copied to a
    common layout) and a non-contiguous incoming gradient."""
    qkv = torch.randn(1, 10, 9, 3, 2, 16, device=DEVICE, requires_grad=True)
    q, k, v = qkv.unbind(3)
    rpb = torch.randn(2, 5, 5, device=DEVICE)
    grad = torch.randn(1, 9, 10, 2, 16, device=DEVICE).transpose(1, 2)
    for k_in in (k, k.contiguous()):
        got = torch.autograd.grad(na2d(q, k_in, v, 3, 2, rpb=rpb, backend="triton"), qkv, grad)[0]
        want = torch.autograd.grad(na2d(q, k_in, v, 3, 2, rpb=rpb, backend="reference"), qkv, grad)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("spatial, kernel, dilation, stride, with_rpb", [
    ((10, 9), 3, 2, 1, True), ((12, 13), 4, 1, 4, False), ((23,), 5, 2, 3, True), ((5, 6, 7), 3, (1, 2, 1), 1, True),
], ids=["2d", "2d-window-no-rpb", "1d", "3d"])
def test_packed_qkv_matches_the_slices(spatial, kernel, dilation, stride, with_rpb):
    """na*d_qkv on the packed tensor: the output and the qkv / rpb gradients of na*d on its slices
    (the Triton backend writes the qkv gradient into one tensor, in the packed layout)."""
    from visattn.kernels import na1d_qkv, na2d_qkv, na3d_qkv

    packed_fn = {1: na1d_qkv, 2: na2d_qkv, 3: na3d_qkv}[len(spatial)]
    ks = (kernel,) * len(spatial)
    qkv = torch.randn(2, *spatial, 3, 2, 16, device=DEVICE, requires_grad=True)
    rpb = torch.randn(2, *(2 * x - 1 for x in ks), device=DEVICE, requires_grad=True) if with_rpb else None
    inputs = [qkv] + ([rpb] if with_rpb else [])
    grad = torch.randn(2, *spatial, 2, 16, device=DEVICE)
    out = packed_fn(qkv, kernel, dilation, stride, rpb=rpb, backend="triton")
    got = [out, *torch.autograd.grad(out, inputs, grad)]
    ref = FN[len(spatial)](*qkv.unbind(-3), kernel, dilation, stride, rpb=rpb, backend="reference")
    want = [ref, *torch.autograd.grad(ref, inputs, grad)]
    assert got[1].stride() == qkv.stride()
    for name, g, w in zip(["out", "dqkv", "drpb"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_packed_qkv_with_a_gapped_view():
    """A packed qkv whose layout empty_like cannot reproduce (every other channel of a larger
    tensor) still gets the right gradient (three tensors, stacked)."""
    from visattn.kernels import na2d_qkv

    base = torch.randn(1, 9, 10, 3, 2, 32, device=DEVICE, requires_grad=True)
    qkv = base[..., ::2]
    grad = torch.randn(1, 9, 10, 2, 16, device=DEVICE)
    got = torch.autograd.grad(na2d_qkv(qkv, 3, backend="triton"), base, grad)[0]
    want = torch.autograd.grad(na2d(*qkv.unbind(-3), 3, backend="reference"), base, grad)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("shape, match", [
    ((1, 9, 9, 2, 16), r"qkv must be \[B, \*spatial \(2 axes\), 3, heads, head_dim\], got shape \(1, 9, 9, 2, 16\)"),
    ((1, 9, 9, 4, 2, 16), r"na2d_qkv: qkv must be .* got shape \(1, 9, 9, 4, 2, 16\)"),
])
def test_packed_qkv_bad_shape(shape, match):
    from visattn.kernels import na2d_qkv

    with pytest.raises(ValueError, match=match):
        na2d_qkv(torch.randn(*shape, device=DEVICE), 3)


def test_fp16_forward_backward():
    """Half precision (bf16 only on CUDA: the interpreter's bf16 arithmetic is wrong)."""
    q, k, v, rpb = _inputs((9, 10), 3, 16, True, dtype=torch.float16)
    grad = torch.randn(q.shape, device=DEVICE, dtype=torch.float16)
    got = _fwd_bwd(na2d, q, k, v, rpb, grad, "triton", 3, 2)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v, rpb)]
    want = _fwd_bwd(na2d, *ref_in, grad.float(), "reference", 3, 2)
    for g, w in zip(got, want):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g.float(), w, rtol=3e-2, atol=3e-2)


def test_fp32_rpb_with_half_inputs():
    """Under autocast q, k, v are half while the rpb parameter stays fp32: its gradient stays fp32."""
    q, k, v, _ = _inputs((9, 10), 3, 16, False, dtype=torch.float16)
    rpb = torch.randn(2, 5, 5, device=DEVICE, requires_grad=True)
    out = na2d(q, k, v, 3, rpb=rpb, backend="triton")
    (drpb,) = torch.autograd.grad(out.float().sum(), rpb)
    assert drpb.dtype == torch.float32
    ref = na2d(q.float(), k.float(), v.float(), 3, rpb=rpb, backend="reference")
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_torch_compile_fullgraph():
    """Under torch.compile the op is a custom op with a fake implementation: one graph, same numbers."""
    q, k, v, rpb = _inputs((9, 10), 3, 16, True)
    fn = torch.compile(lambda q, k, v, r: na2d(q, k, v, 3, 2, rpb=r, backend="triton"), fullgraph=True,
                       backend="aot_eager")
    out = fn(q, k, v, rpb)
    grads = torch.autograd.grad(out.sum(), (q, k, v, rpb))
    ref = na2d(q, k, v, 3, 2, rpb=rpb, backend="reference")
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v, rpb))
    for g, w in zip([out, *grads], [ref, *ref_grads]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5)


def test_attention_module_compiles_fullgraph():
    """NeighborhoodAttention2d as the NAT models build it (per-axis tuples, rpb, dilation) traces
    into one graph through the custom op; forward and gradients equal the eager module's."""
    from visattn.layers import NeighborhoodAttention2d

    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(32, 2, kernel_size=(3, 3), dilation=(2, 2), backend="triton").to(DEVICE)
    x = torch.randn(1, 9, 10, 32, device=DEVICE, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    grads = torch.autograd.grad(out.sum(), (x, layer.rpb, layer.qkv.weight))
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.sum(), (x, layer.rpb, layer.qkv.weight))
    for g, w in zip([out, *grads], [ref, *ref_grads]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5)


def test_unsupported_calls_raise():
    q, k = (torch.randn(1, 9, 9, 2, 16, device=DEVICE) for _ in range(2))
    with pytest.raises(ValueError, match=r"does not support v head_dim 8 != q head_dim 16"):
        na2d(q, k, torch.randn(1, 9, 9, 2, 8, device=DEVICE), 3, backend="triton")
    with pytest.raises(ValueError, match=r"does not support dtype torch.float64"):
        na2d(q.double(), k.double(), k.double(), 3, backend="triton")
    from visattn.kernels import na2d_qkv

    with pytest.raises(ValueError, match=r"does not support dtype torch.float64"):
        na2d_qkv(torch.randn(1, 9, 9, 3, 2, 16, device=DEVICE, dtype=torch.float64), 3, backend="triton")
    with pytest.raises(ValueError, match=r"does not support head_dim 320 > 256"):
        big = torch.randn(1, 9, 9, 1, 320, device=DEVICE)
        na2d(big, big, big, 3, backend="triton")
    many = torch.randn(1, 3, 3, 1, 1, device=DEVICE).expand(65536, 3, 3, 1, 16)  # a view: no memory
    with pytest.raises(ValueError, match=r"does not support batch x heads = 65536 > 65535"):
        na2d(many, many, many, 3, backend="triton")


def test_custom_scale():
    q, k, v, rpb = _inputs((9, 10), 3, 16, True)
    _assert_triton_matches_reference(na2d, q, k, v, rpb, 3, scale=2.0)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the interpreter's refusal of CPU bf16")
def test_interpreter_refuses_bf16():
    """The interpreter's bf16 products are wrong (not merely slow): bf16 CPU calls are refused,
    never answered with wrong numbers."""
    from visattn.kernels import routed_attention

    q = torch.randn(1, 9, 9, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"does not support bfloat16 CPU tensors under TRITON_INTERPRET=1"):
        na2d(q, q, q, 3, backend="triton")
    index = torch.zeros(1, 4, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"does not support bfloat16 CPU tensors under TRITON_INTERPRET=1"):
        routed_attention(torch.randn(1, 4, 4, 2, 8, dtype=torch.bfloat16), *(torch.randn(1, 4, 4, 2, 8, dtype=torch.bfloat16)
                         for _ in range(2)), index, backend="triton")


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (torch.randn(1, 9, 9, 2, 16) for _ in range(3))
    with pytest.raises(ValueError, match="the kernels need CUDA"):
        na2d(q, k, v, 3, backend="triton")


def test_auto_is_reference_on_cpu(monkeypatch):
    """``auto`` never runs the interpreter for CPU tensors."""
    called = []
    monkeypatch.setitem(triton_na.__dict__, "na_forward", lambda *a: called.append(1))
    q, k, v = (torch.randn(1, 9, 9, 2, 16) for _ in range(3))
    torch.testing.assert_close(na2d(q, k, v, 3), na2d(q, k, v, 3, backend="reference"))
    assert not called


def test_auto_falls_back_with_one_warning_per_reason(monkeypatch):
    """``auto`` on a CUDA call the kernels cannot run: the reference, with one warning per (op,
    reason) naming the reason (on the GPU, tests/test_gpu.py runs this through na2d itself)."""
    import warnings

    from visattn.kernels import _checks

    monkeypatch.setattr(_checks, "_fallback_warned", set())

    class CudaLike:  # what auto_picks_triton reads of a tensor
        is_cuda = True

    reason = lambda q, v: "dtype torch.float64 (supported: float16, bfloat16, float32)"
    with pytest.warns(UserWarning, match=r"test op falls back to the reference backend: the triton backend does "
                                         r"not support dtype torch.float64"):
        assert not _checks.auto_picks_triton("test op", CudaLike(), CudaLike(), reason, stacklevel=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _checks.auto_picks_triton("test op", CudaLike(), CudaLike(), reason, stacklevel=1)
    assert _checks.auto_picks_triton("test op", CudaLike(), CudaLike(), lambda q, v: None, stacklevel=1)


def test_kernel_call_checks_its_grid():
    from visattn.kernels.layer_norm import _layer_norm_fwd

    with pytest.raises(ValueError, match=r"grid must have 1 to 3 program counts, got \(\)"):
        KernelCall(_layer_norm_fwd, (), (), {})
    call = KernelCall(_layer_norm_fwd, (4,), (), {})
    assert call.grid == (4, 1, 1)


def test_tuner_keeps_each_candidates_best_round_and_skips_refused_ones(monkeypatch):
    """``fastest`` times every candidate twice (an idle GPU clocks up during the first timings) and
    keeps the best; a candidate that runs out of resources is skipped."""
    import triton
    import triton.testing

    from visattn.kernels._triton_common import fastest

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("VISATTN_AUTOTUNE", "1")
    # Candidate "a" is measured first, while the clock ramps up: slow in round one only.
    rounds = {"a": iter([9.0, 1.0]), "b": iter([2.0, 2.5])}
    launched = []

    def launch(cfg):
        launched.append(cfg)
        if cfg == "big":
            raise triton.runtime.errors.OutOfResources(1, 0, "shared memory")

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), next(rounds[launched[-1]]))[1])
    best, timings = fastest(["a", "big", "b"], launch)
    assert best == "a" and timings == {"a": 1.0, "b": 2.0}
    assert launched.count("big") == 1
    with pytest.raises(RuntimeError, match=r"none of the 1 Triton launch candidates fits .*\['big'\]"):
        fastest(["big"], launch)


def test_tuner_remembers_timed_picks_only(monkeypatch):
    """``Tuner.pick`` times a key once and reuses its pick; an untimed pick (the interpreter) is the
    first candidate and is not remembered, so a later call may still tune."""
    import triton.testing

    from visattn.kernels._triton_common import Tuner

    tuner = Tuner()
    assert tuner.pick("k", ["a", "b"], lambda cfg: None) == "a" and not tuner.best  # interpreting: untimed
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("VISATTN_AUTOTUNE", "1")
    launched = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), {"a": 3.0, "b": 1.0}[launched[-1]])[1])
    assert tuner.pick("k", ["a", "b"], launched.append) == "b"
    assert tuner.timings == {"k": {"a": 3.0, "b": 1.0}} and len(launched) == 4  # two rounds
    assert tuner.pick("k", ["a", "b"], launched.append) == "b" and len(launched) == 4  # remembered


def test_forward_tuning_class_includes_the_rpb_dtype(monkeypatch):
    """The tuner times the forward per shape class; an fp32 rpb (the models' under autocast) and one
    of q's dtype are two classes (their fastest launches differ), a repeated dtype is not a new one."""
    keys = []

    def pick(key, candidates, launch):
        keys.append(key)
        return candidates[0]

    monkeypatch.setattr(triton_na.TUNER, "pick", pick)
    q, k, v, rpb = (t.detach().half() for t in _inputs((9, 10), 3, 16, True))
    for bias in (rpb, rpb.float(), rpb.clone(), None):
        monkeypatch.setattr(triton_na, "_CALLS", CallCache())  # each call asks the tuner
        na2d(q, k, v, 3, rpb=bias, backend="triton")
    forward = [key for key in keys if key[0] == "fwd"]
    assert len(forward) == 4 and len(set(forward)) == 3, forward
