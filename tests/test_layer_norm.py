"""visattn.kernels.layer_norm: the Triton forward (CPU interpreter) against F.layer_norm on ragged
row counts and widths, the dispatcher's choices, and the LayerNorm module (keys, TorchScript)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from visattn.kernels.layer_norm import (layer_norm, layer_norm_backward, layer_norm_forward, residual_backward,
                                       residual_forward, row_programs)
from visattn.layers import LayerNorm


@pytest.mark.parametrize("shape", [(37, 60), (1, 3, 5, 144), (2, 7, 180), (5, 1), (3, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_triton_matches_torch(shape, dtype, affine):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    C = shape[-1]
    w = torch.randn(C).to(dtype) if affine else None
    b = torch.randn(C).to(dtype) if affine else None
    out = layer_norm(x, w, b, 1e-6, backend="triton")
    expected = F.layer_norm(x.float(), (C,), None if w is None else w.float(), None if b is None else b.float(), 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


def test_triton_reads_strided_rows():
    x = torch.randn(6, 10, 48)[:, ::2, 8:40]  # rows 32 wide, not contiguous
    w, b = torch.randn(32), torch.randn(32)
    torch.testing.assert_close(layer_norm(x, w, b, backend="triton"), F.layer_norm(x, (32,), w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(37, 60), (2, 3, 5, 144), (3, 257), (70, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_triton_backward_matches_torch(shape, affine):
    """dx, dweight, dbias of the Triton kernels against autograd through F.layer_norm (float32),
    with more rows than one program takes so the partial weight/bias sums are reduced."""
    torch.manual_seed(0)
    C = shape[-1]
    x = (torch.randn(shape) * 2 + 0.5).requires_grad_()
    w = torch.randn(C, requires_grad=True) if affine else None
    b = torch.randn(C, requires_grad=True) if affine else None
    dy = torch.randn(shape)
    inputs = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(layer_norm(x, w, b, 1e-5, backend="triton"), inputs, dy)
    expected = torch.autograd.grad(F.layer_norm(x, (C,), w, b, 1e-5), inputs, dy)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_triton_under_autocast_reads_half_rows_and_returns_fp32():
    """Under autocast the kernels read half-precision x as it is (no fp32 copy) and return fp32,
    as F.layer_norm does there; x's gradient comes back in x's dtype, the same numbers as autograd
    through the fp32 cast."""
    torch.manual_seed(0)
    x = (torch.randn(3, 7, 96) * 2).half().requires_grad_()
    w, b = torch.randn(96, requires_grad=True), torch.randn(96, requires_grad=True)
    dy = torch.randn(3, 7, 96)
    with torch.autocast("cpu", dtype=torch.float16):
        got = layer_norm(x, w, b, backend="triton")
    expected = F.layer_norm(x.float(), (96,), w, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got, (x, w, b), dy)
    want = torch.autograd.grad(expected, (x, w, b), dy)
    assert grads[0].dtype == torch.float16
    for g, e in zip(grads, want):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_autocast_output_rounds_the_same_result(backend):
    """``autocast_output``: under autocast the output comes in the autocast dtype, equal to the fp32
    output cast down (what a following Linear would see), and the gradients of a Linear after it
    are bit-identical with and without it; outside autocast it changes nothing."""
    torch.manual_seed(0)
    x = (torch.randn(4, 5, 48) * 2).requires_grad_()
    w, b = torch.randn(48, requires_grad=True), torch.randn(48, requires_grad=True)
    fc = torch.nn.Linear(48, 16)
    results = []
    for flag in (False, True):
        with torch.autocast("cpu", dtype=torch.float16):
            normed = layer_norm(x, w, b, backend=backend, autocast_output=flag)
            out = fc(normed)
        assert normed.dtype == (torch.float16 if flag else torch.float32)
        results.append((normed, out, torch.autograd.grad(out.float().square().sum(), (x, w, b, fc.weight))))
    (ref_normed, ref_out, ref_grads), (normed, out, grads) = results
    assert torch.equal(normed, ref_normed.half())
    assert torch.equal(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)
    assert layer_norm(x, w, b, backend=backend, autocast_output=True).dtype == torch.float32


def test_autocast_output_compiles_fullgraph():
    """Under torch.compile (fullgraph) and autocast, ``autocast_output`` still returns the autocast
    dtype with the eager values: the autocast checks trace (torch 2.11's dynamo could not trace
    ``torch.amp.is_autocast_available``, which the eager path asks about meta tensors)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 7, 32), torch.randn(32), torch.randn(32)
    fn = torch.compile(lambda x: layer_norm(x, w, b, autocast_output=True), fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = fn(x), layer_norm(x, w, b, autocast_output=True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref)


def test_triton_backward_of_strided_input_and_grad():
    x = torch.randn(6, 10, 48)[:, ::2, 8:40].requires_grad_()
    w = torch.randn(32, requires_grad=True)
    dy = torch.randn(6, 10, 32).transpose(0, 1).contiguous().transpose(0, 1)[:, ::2]  # strided grad
    got = torch.autograd.grad(layer_norm(x, w, None, backend="triton"), (x, w), dy)
    expected = torch.autograd.grad(F.layer_norm(x, (32,), w, None), (x, w), dy)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_dispatch_and_bad_input():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    # CPU tensors take F.layer_norm under "auto": the gradient flows.
    layer_norm(x, w, None).sum().backward()
    assert x.grad is not None and w.grad is not None
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        layer_norm(x.detach(), torch.ones(7), None, backend="triton")
    with pytest.raises(ValueError, match="unknown layer_norm backend"):
        layer_norm(x, w, None, backend="apex")
    with pytest.raises(ValueError, match="float64"):
        layer_norm(x.detach().double(), None, None, backend="triton")


def test_module_is_a_drop_in_for_nn_layernorm():
    torch.manual_seed(0)
    ref = nn.LayerNorm(20, eps=1e-6)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    ours = LayerNorm(20, eps=1e-6)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 20)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)  # CPU: F.layer_norm itself
    scripted = torch.jit.script(ours)
    torch.testing.assert_close(scripted(x), ref(x), rtol=0, atol=0)


# Reduced models of every family whose blocks set autocast_norm_output, and an input for each.
_AUTOCAST_NORM_MODELS = {
    "dinat": ("visattn_dinat_t", dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), mlp_ratio=2,
                                      dilations=[[2], [1], [1], [1]], num_classes=5), (1, 3, 64, 64)),
    "vitrpb": ("visattn_vitrpb_s", dict(img_size=28, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=5),
               (1, 3, 28, 28)),
    "biformer": ("visattn_biformer_t", dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 48), qk_dims=(16, 32, 40, 48),
                                            head_dim=8, n_win=2, topks=(1, 2, 4, -2), img_size=64,
                                            num_classes=5), (1, 3, 64, 64)),
    "tcsr": ("visattn_tcsr_b_x2", dict(embed_dim=16, depths=(1,), num_heads=(2,), kernel_size=5), (1, 3, 12, 12)),
    "hat": ("visattn_hat_s_x2", dict(embed_dim=12, depths=(1,), num_heads=(2,), window_size=4, compress_ratio=3,
                                     squeeze_factor=4, mlp_ratio=2.0), (1, 3, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(_AUTOCAST_NORM_MODELS))
def test_models_autocast_norm_output_changes_no_value(name):
    """The blocks whose norms return the autocast dtype compute, under autocast, exactly what they
    compute with fp32 norm outputs: output and parameter gradients bit-identical."""
    import timm

    import visattn  # noqa: F401  (registers the models)

    arch, kwargs, shape = _AUTOCAST_NORM_MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, **kwargs)
    norms = [m for m in model.modules() if isinstance(m, LayerNorm) and m.autocast_output]
    assert norms, f"{arch} sets autocast_output on none of its norms"
    x = torch.rand(shape)
    results = []
    for flag in (True, False):
        for norm in norms:
            norm.autocast_output = flag
        torch.manual_seed(1)  # the same drop-path draws in both runs
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        grads = torch.autograd.grad(out.float().square().mean(), [p for p in model.parameters()], allow_unused=True)
        results.append((out, grads))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    for a, b in zip(grads_a, grads_b):
        assert (a is None and b is None) or torch.equal(a, b)


def _aten_residual(x, branch, gamma, keep01, keep_prob):
    """timm's ``x + DropPath(LayerScale(branch))`` on ATen ops, with the given 0/1 draw."""
    t = branch if gamma is None else branch * gamma
    if keep01 is not None:
        t = t * keep01.div(keep_prob)
    return x + t


@pytest.mark.parametrize("branch_dtype, gamma_dtype", [(torch.float16, None), (torch.float16, torch.float32),
                                                       (torch.float32, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("drop", [False, True])
def test_residual_kernels_round_as_aten(branch_dtype, gamma_dtype, drop):
    check_residual_kernels(branch_dtype, gamma_dtype, drop, "cpu")


def check_residual_kernels(branch_dtype, gamma_dtype, drop, device, shape=(3, 5, 7, 40)):
    """The fused residual add (forward, with and without its LayerNorm; backward) gives bit for bit
    what ATen gives for timm's layer scale and drop path (each product rounded to its dtype), and
    the LayerNorm of the sum that layer_norm_forward gives; the column sums match ATen's sums.
    (Also run on CUDA in bf16 by tests/test_gpu.py.)"""
    torch.manual_seed(0)
    B, H, W, C = shape  # the default is ragged: rows and columns both masked in the last tile
    x = torch.randn(B, H, W, C, device=device)
    branch = torch.randn(B, H, W, C, device=device).to(branch_dtype)
    gamma = None if gamma_dtype is None else (torch.rand(C, device=device) + 0.3).to(gamma_dtype)
    t_dtype = branch_dtype if gamma is None else torch.promote_types(branch_dtype, gamma_dtype)
    keep_prob = 0.7
    keep = (torch.arange(B, device=device) % 2 == 0).view(B, 1, 1, 1).to(t_dtype) if drop else None
    scale = (torch.tensor(1.0) / torch.tensor(keep_prob)).item()
    w, b = torch.randn(C, device=device), torch.randn(C, device=device)

    x_r, branch_r = x.clone().requires_grad_(), branch.clone().requires_grad_()
    gamma_r = None if gamma is None else gamma.clone().requires_grad_()
    expected = _aten_residual(x_r, branch_r, gamma_r, keep, keep_prob)
    s, out, rows, stats = residual_forward(x, branch, gamma, keep, scale if drop else 1.0,
                                           (w, b, 1e-5, torch.float32))
    assert s.dtype == expected.dtype and torch.equal(s, expected.detach())
    out_ln, rows_ln, stats_ln = layer_norm_forward(s, w, b, 1e-5, torch.float32)
    # The norm itself only to fp32 rounding: the kernels' layouts (and so their sums' order) follow their loads' dtypes.
    torch.testing.assert_close((out, stats), (out_ln, stats_ln), rtol=1e-6, atol=1e-5)
    s_plain = residual_forward(x, branch, gamma, keep, scale if drop else 1.0)[0]
    assert torch.equal(s_plain, s)

    grad_s = torch.randn(B, H, W, C, device=device)
    expected.backward(grad_s)
    slots = 1 + (gamma is not None)
    partial = torch.empty(slots, row_programs(B * H * W, C), C, device=device)
    grad_x, grad_branch = residual_backward(grad_s, branch_dtype, branch, gamma, keep, scale if drop else 1.0,
                                            partial, branch_sum=True)
    assert grad_x is grad_s and grad_branch.dtype == branch_dtype and torch.equal(grad_branch, branch_r.grad)
    sums = partial.sum(1)
    torch.testing.assert_close(sums[-1], grad_branch.float().sum((0, 1, 2)), rtol=1e-4, atol=1e-3)
    if gamma is not None:
        tol = 1e-3 if t_dtype == torch.float32 else 1e-2  # fp32 sums in other orders, then rounded to T
        torch.testing.assert_close(sums[0].to(t_dtype).to(gamma_dtype), gamma_r.grad, rtol=tol, atol=tol)

    # With the LayerNorm: its backward plus grad_s, then the branch gradient of that.
    grad_out = torch.randn(B, H, W, C, device=device)
    dx_ln, dw, db = layer_norm_backward(grad_out, rows, w, stats, s.shape, b.dtype, grad_residual=grad_s)
    partial = torch.empty(2 + (gamma is not None), row_programs(B * H * W, C), C, device=device)
    grad_x, grad_branch = residual_backward(grad_s, branch_dtype, branch, gamma, keep, scale if drop else 1.0,
                                            partial, norm=(grad_out, rows, w, stats))
    torch.testing.assert_close(grad_x, dx_ln, rtol=1e-6, atol=1e-5)  # fp32 rounding, as the forward's norm
    branch_r.grad = None
    _aten_residual(x_r, branch_r, gamma_r, keep, keep_prob).backward(grad_x)
    assert torch.equal(grad_branch, branch_r.grad)
    torch.testing.assert_close(partial[:2].sum(1), torch.stack((dw, db)), rtol=1e-4, atol=1e-3)  # summed in other orders


def test_residual_kernels_refuse_bad_input():
    x, branch = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="keep must hold 2 draws in torch.float32"):
        residual_forward(x, branch, None, torch.ones(3, 1, 1), 1.0)
    with pytest.raises(ValueError, match="branch must have x's shape"):
        residual_forward(x, branch[:, :3], None, None, 1.0)
    with pytest.raises(ValueError, match="partial must be a contiguous fp32"):
        residual_backward(x, torch.float32, None, None, None, 1.0, torch.empty(2, 1, 8), branch_sum=True)
    with pytest.raises(ValueError, match="needs the forward's branch"):
        residual_backward(x, torch.float32, None, torch.ones(8), None, 1.0, None)
