"""GPU checks (marked ``gpu``, deselected by default; run with ``-m gpu`` on a CUDA machine, skipped
without CUDA)."""
import pytest
import timm
import torch

import visattn
from golden_data import load_golden

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda_fp32(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("the gpu tests need CUDA (run them with -m gpu on a CUDA machine)")
    # Correctness only: the default launch configs, no tuning (each candidate is a compilation).
    monkeypatch.setenv("VISATTN_AUTOTUNE", "0")
    # The goldens are exact fp32: keep TF32 off for convs and matmuls.
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@pytest.mark.parametrize("name", ["nat", "dinat", "dinat_s", "dinat_isotropic", "vitrpb", "dinat_mm"])
def test_golden_on_cuda(name):
    meta, sd, io = load_golden(name)
    model = visattn.from_official(meta, sd).cuda()
    with torch.no_grad():
        out = model(io["input"].cuda())
    outs = out if isinstance(out, (list, tuple)) else [out]
    refs = [io[f"output.{i}"] for i in range(len(outs))] if isinstance(out, (list, tuple)) else [io["output"]]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o.cpu(), r, rtol=0, atol=meta["recommended_atol"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_precision_on_cuda(dtype):
    q, k, v = torch.randn(3, 2, 40, 33, 4, 32, device="cuda").unbind(0)
    rpb = torch.randn(4, 13, 13, device="cuda")
    ref = visattn.kernels.na2d(q, k, v, 7, (2, 3), rpb=rpb)
    cpu = visattn.kernels.na2d(q.cpu(), k.cpu(), v.cpu(), 7, (2, 3), rpb=rpb.cpu())
    torch.testing.assert_close(ref.cpu(), cpu, rtol=1e-5, atol=1e-5)
    half = visattn.kernels.na2d(q.to(dtype), k.to(dtype), v.to(dtype), 7, (2, 3), rpb=rpb.to(dtype))
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), ref, rtol=2e-2, atol=2e-2)


def test_training_step_bf16_autocast():
    model = timm.create_model("visattn_dinat_t", num_classes=10).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(8, 3, 224, 224, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", ["visattn_dinat_t", "visattn_biformer_s"])
def test_fused_blocks_match_modular_training_on_cuda(name, autocast, monkeypatch):
    """Training mode (drop path on): the fused blocks (one autograd node each) give the modular
    blocks' loss and parameter gradients, with the same drop-path draws and the same routing."""
    import visattn.kernels.routed as routed_op
    import visattn.layers.fused_block as fused_block
    from visattn.layers import BiLevelRoutingAttention, NHWCTransformerBlock

    # The fused run replays the modular run's routing: window scores that (nearly) tie can pick
    # differently after any change of summation order upstream, which changes the function; the
    # routing has its own tests.
    routings, route = [], routed_op.region_topk_2d_triton
    monkeypatch.setattr(routed_op, "region_topk_2d_triton", lambda *args: routings.append(route(*args)) or routings[-1])
    monkeypatch.setattr(fused_block, "region_topk_2d_triton", lambda *args: routings.pop(0))

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, drop_path_rate=0.2).cuda().train()
    for m in model.modules():
        # Batch statistics would cancel the gradients of the biases before each BatchNorm (BiFormer's
        # stem and downsamplers, and its last MLP bias before the head's BatchNorm): exactly zero,
        # computed as rounding noise that no two summation orders share. Running statistics keep them.
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    blocks = [m for m in model.modules() if isinstance(m, NHWCTransformerBlock)]
    x, y = torch.randn(4, 3, 224, 224, device="cuda"), torch.randint(0, 10, (4,), device="cuda")
    results = []
    for fused in (False, True):
        for b in blocks:
            b.fused = fused
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
        if not fused:
            routed_calls = len(routings)
    # Every NA block whose dilated kernel fits a 14x14 map, every routed block on BiFormer's 7x7 grid.
    routed = [b for b in blocks if isinstance(b.attn, BiLevelRoutingAttention)]
    expected = routed or [b for b in blocks if b.attn.dilation[0] * 7 <= 14]
    assert expected and all(b.fused_path_taken(torch.empty(1, 14, 14, b.norm1.normalized_shape[0], device="cuda"))
                            for b in expected)
    assert routed_calls == len(routed) and not routings  # the fused run used every recorded routing
    (loss_m, grads_m), (loss_f, grads_f) = results
    tol = 2e-2 if autocast else 1e-4
    assert abs(loss_f - loss_m) <= tol * abs(loss_m)
    errors = {param: ((grads_f[param].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12)).item()
              for param, g in grads_m.items()}
    assert all(grads_f[param].dtype == g.dtype for param, g in grads_m.items())
    assert not {param: err for param, err in errors.items() if not err < tol}


# --- Triton neighborhood attention at model sizes, every dtype (issue 4) ---------------------

NA_GPU_CASES = [
    # spatial, heads, head_dim, kernel, dilation, stride
    pytest.param((56, 56), 2, 32, 7, 1, 1, id="nat-t-s1"),
    pytest.param((56, 56), 2, 32, 7, 8, 1, id="dinat-d8"),
    pytest.param((63, 45), 3, 64, 13, (1, 2), 1, id="k13-ragged-d64"),
    pytest.param((64, 64), 4, 16, 16, 1, 16, id="window16-d16"),
    pytest.param((33, 30), 2, 96, 9, 2, (3, 1), id="d96-stride"),
    pytest.param((20, 22), 2, 128, 5, 4, 1, id="d128"),
    pytest.param((700,), 4, 64, 31, 4, 1, id="1d-k31"),
    pytest.param((12, 20, 17), 2, 32, (3, 5, 5), (1, 2, 1), (1, 1, 2), id="3d"),
]
NA_TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # relative L2 error


@pytest.mark.parametrize("dtype", list(NA_TOLERANCE), ids=str)
@pytest.mark.parametrize("spatial, heads, head_dim, kernel, dilation, stride", NA_GPU_CASES)
def test_triton_na_matches_fp64_reference(spatial, heads, head_dim, kernel, dilation, stride, dtype):
    from visattn.kernels import na1d, na2d, na3d

    fn = {1: na1d, 2: na2d, 3: na3d}[len(spatial)]
    ks = (kernel,) * len(spatial) if isinstance(kernel, int) else kernel
    q, k, v = (torch.randn(2, *spatial, heads, head_dim, device="cuda") for _ in range(3))
    rpb = torch.randn(heads, *(2 * x - 1 for x in ks), device="cuda")
    grad = torch.randn_like(q)
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v, rpb)]
    out = fn(*inputs[:3], kernel, dilation, stride, rpb=inputs[3], backend="triton")
    got = [out, *torch.autograd.grad(out, inputs, grad.to(dtype))]
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = fn(*ref_in[:3], kernel, dilation, stride, rpb=ref_in[3], backend="reference")
    want = [ref, *torch.autograd.grad(ref, ref_in, grad.double())]
    for name, g, w in zip(["out", "dq", "dk", "dv", "drpb"], got, want):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        rel = ((g.double() - w).norm() / w.norm()).item()
        assert rel < NA_TOLERANCE[dtype], f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("kind", ["fwd", "bwd_dq", "bwd_dkdv"])
def test_every_2d_tuning_candidate_on_cuda(monkeypatch, kind):
    """Each 2-D launch candidate of each kernel (the tuner may pick any; the others at their
    defaults) in bf16 on the GPU, ragged sizes, rpb and dilation, against the fp64 reference."""
    from visattn.kernels import na2d, triton_na
    from visattn.kernels._triton_common import CallCache

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 30, 27, 2, 32, device="cuda") for _ in range(3))
    rpb = torch.randn(2, 13, 13, device="cuda")
    grad = torch.randn_like(q)
    ref_in = [t.double().requires_grad_() for t in (q, k, v, rpb)]
    ref = na2d(*ref_in[:3], 7, (1, 2), rpb=ref_in[3], backend="reference")
    want = [ref, *torch.autograd.grad(ref, ref_in, grad.double())]
    for config in triton_na._CANDIDATES[kind][2]:
        monkeypatch.setattr(triton_na, "_candidates",
                            lambda k_, r, c=config: [c] if k_ == kind else [triton_na._CANDIDATES[k_][r][0]])
        monkeypatch.setattr(triton_na, "_CALLS", CallCache())
        inputs = [t.bfloat16().requires_grad_() for t in (q, k, v, rpb)]
        out = na2d(*inputs[:3], 7, (1, 2), rpb=inputs[3], backend="triton")
        got = [out, *torch.autograd.grad(out, inputs, grad.bfloat16())]
        for name, g, w in zip(["out", "dq", "dk", "dv", "drpb"], got, want):
            rel = ((g.double() - w).norm() / w.norm()).item()
            assert rel < NA_TOLERANCE[torch.bfloat16], f"{config} {name}: relative error {rel:.2e}"


@pytest.mark.parametrize("rpb_dtype", [torch.bfloat16, torch.float32, None], ids=str)
def test_window_table_forwards_at_nat_t_stage_1_on_cuda(monkeypatch, rpb_dtype):
    """Every window-table forward candidate at NAT-T stage-1 geometry (B4) in bf16: finite and the
    fp64 reference's output, with a bf16 rpb, an fp32 one (split into two bf16 parts) and none.
    Queries of the tiles' lower rows see no key of their window in the first step; with rpb that
    step once turned into NaN on the GPU (the masked value's exp2 rounding), not on the CPU."""
    from visattn.kernels import na2d, na2d_qkv, triton_na
    from visattn.kernels._triton_common import CallCache

    torch.manual_seed(0)
    qkv = torch.randn(4, 56, 56, 3, 2, 32, device="cuda")
    rpb = 0.02 * torch.randn(2, 13, 13, device="cuda")
    bias = None if rpb_dtype is None else rpb.to(rpb_dtype)
    q, k, v = qkv.bfloat16().double().unbind(3)
    want = na2d(q, k, v, 7, rpb=None if bias is None else bias.double(), backend="reference")
    tables = [c for c in triton_na._CANDIDATES["fwd"][2] if c.table]
    assert tables
    for config in tables:
        monkeypatch.setattr(triton_na, "_candidates", lambda k_, r, c=config: [c])
        monkeypatch.setattr(triton_na, "_CALLS", CallCache())
        out = na2d_qkv(qkv.bfloat16(), 7, rpb=bias, backend="triton")
        assert torch.isfinite(out).all(), config
        rel = ((out.double() - want).norm() / want.norm()).item()
        assert rel < NA_TOLERANCE[torch.bfloat16], f"{config}: relative error {rel:.2e}"
        assert next(iter(triton_na._CALLS.entries.values())).classes is not None  # the tables were read


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_qkv_gradient_on_cuda(dtype):
    """na2d_qkv at NAT-T stage-1 size (B4): the packed qkv gradient the kernels write equals the
    fp64 reference's on the slices."""
    from visattn.kernels import na2d, na2d_qkv

    torch.manual_seed(0)
    qkv = torch.randn(4, 56, 56, 3, 2, 32, device="cuda")
    rpb = torch.randn(2, 13, 13, device="cuda")
    grad = torch.randn(4, 56, 56, 2, 32, device="cuda")
    inputs = [qkv.to(dtype).requires_grad_(), rpb.to(dtype).requires_grad_()]
    out = na2d_qkv(inputs[0], 7, rpb=inputs[1], backend="triton")
    got = [out, *torch.autograd.grad(out, inputs, grad.to(dtype))]
    ref_in = [qkv.double().requires_grad_(), rpb.double().requires_grad_()]
    ref = na2d(*ref_in[0].unbind(-3), 7, rpb=ref_in[1], backend="reference")
    want = [ref, *torch.autograd.grad(ref, ref_in, grad.double())]
    assert got[1].stride() == inputs[0].stride()
    for name, g, w in zip(["out", "dqkv", "drpb"], got, want):
        rel = ((g.double() - w).norm() / w.norm()).item()
        assert rel < NA_TOLERANCE[dtype], f"{name}: relative error {rel:.2e}"


def test_auto_uses_triton_on_cuda_and_warns_once_on_fallback():
    from visattn.kernels import _checks, na2d
    from visattn.kernels import na as na_module

    q = torch.randn(1, 9, 9, 2, 16, device="cuda")
    assert na_module._resolve_backend("auto", q, q) is na_module.BACKENDS["triton"]
    _checks._fallback_warned.clear()
    with pytest.warns(UserWarning, match="falls back to the .*reference.*float64"):
        na2d(q.double(), q.double(), q.double(), 3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        na2d(q.double(), q.double(), q.double(), 3)  # once only


# --- Triton routed attention at BiFormer sizes (issue 5) -------------------------------------

@pytest.mark.parametrize("dtype", list(NA_TOLERANCE), ids=str)
@pytest.mark.parametrize("Rq, T, topk, heads", [(49, 64, 1, 2), (49, 16, 4, 4), (49, 4, 16, 8), (64, 64, 4, 4)],
                         ids=["s1-224", "s2-224", "s3-224", "s2-512"])
def test_triton_routed_matches_fp64_reference(Rq, T, topk, heads, dtype):
    from visattn.kernels import routed_attention

    q, k, v = (torch.randn(4, Rq, T, heads, 32, device="cuda") for _ in range(3))
    index = torch.stack([torch.randperm(Rq, device="cuda")[:topk] for _ in range(4 * Rq)]).view(4, Rq, topk)
    grad = torch.randn_like(q)
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = routed_attention(*inputs, index, backend="triton")
    got = [out, *torch.autograd.grad(out, inputs, grad.to(dtype))]
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = routed_attention(*ref_in, index, backend="reference")
    want = [ref, *torch.autograd.grad(ref, ref_in, grad.double())]
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        rel = ((g.double() - w).norm() / w.norm()).item()
        assert rel < NA_TOLERANCE[dtype], f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("dtype", list(NA_TOLERANCE), ids=str)
@pytest.mark.parametrize("size, n_win, topk, heads", [(56, 7, 1, 2), (28, 7, 4, 4), (14, 7, 16, 8), (64, 8, 4, 4)],
                         ids=["s1-224", "s2-224", "s3-224", "s2-512"])
def test_triton_routed_2d_matches_fp64_reference(size, n_win, topk, heads, dtype):
    """The map-layout kernels on slices of one qkv map, as BiFormer calls them."""
    from visattn.kernels import routed_attention_2d

    R = n_win * n_win
    qkv = torch.randn(2, size, size, 3 * heads * 32, device="cuda")
    index = torch.stack([torch.randperm(R, device="cuda")[:topk] for _ in range(2 * R)]).view(2, R, topk)
    grad = torch.randn(2, size, size, heads, 32, device="cuda")
    results = []
    for cast, backend in ((dtype, "triton"), (torch.float64, "reference")):
        x = qkv.to(cast).requires_grad_()
        q, k, v = (t.unflatten(-1, (heads, 32)) for t in x.split(heads * 32, dim=-1))
        out = routed_attention_2d(q, k, v, index, n_win, backend=backend)
        results.append((out, *torch.autograd.grad(out, x, grad.to(cast))))
    for name, g, w in zip(["out", "dqkv"], *results):
        rel = ((g.double() - w).norm() / w.norm()).item()
        assert rel < NA_TOLERANCE[dtype], f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("size, n_win, topk, C", [(56, 7, 1, 64), (14, 7, 16, 256), (64, 8, 4, 128)],
                         ids=["s1-224", "s3-224", "s2-512"])
def test_region_topk_2d_triton_on_cuda(size, n_win, topk, C):
    """BiFormer's routing at its stage sizes: the triton backend picks the reference's windows in
    fp32 (both route the same descriptors), and in bf16 the fp32 ranking of the bf16 maps."""
    from visattn.kernels import region_topk_2d

    qkv = torch.randn(4, size, size, 3 * C, device="cuda")
    q, k = qkv[..., :C], qkv[..., C:2 * C]
    want = region_topk_2d(q, k, n_win, topk, C ** -0.5, backend="reference")
    assert torch.equal(region_topk_2d(q, k, n_win, topk, C ** -0.5, backend="triton"), want)
    qb, kb = q.bfloat16(), k.bfloat16()
    assert torch.equal(region_topk_2d(qb, kb, n_win, topk, C ** -0.5, backend="triton"),
                       region_topk_2d(qb.float(), kb.float(), n_win, topk, C ** -0.5, backend="reference"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size, C, k", [(56, 64, 5), (14, 256, 3), (28, 128, 5)], ids=["lepe-s1", "pos-s3", "lepe-s2"])
def test_depthwise_conv_on_cuda(size, C, k, dtype):
    """The fused depthwise conv + residual against F.conv2d in fp64, forward and every gradient;
    bf16 under autocast (the conv in bf16, an fp32 residual), as BiFormer's blocks run it."""
    from visattn.kernels import depthwise_conv2d_nhwc

    x = torch.randn(8, size, size, 2 * C, device="cuda")[..., C:]
    weight = torch.randn(C, 1, k, k, device="cuda") * 0.2
    bias = torch.randn(C, device="cuda")
    residual = torch.randn(8, size, size, C, device="cuda")
    grad = torch.randn(8, size, size, C, device="cuda")
    results = []
    for backend, cast in (("triton", dtype), ("torch", torch.float64)):
        leaves = [t.double().requires_grad_() if cast == torch.float64 else t.clone().requires_grad_()
                  for t in (x, weight, bias, residual)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cast == torch.bfloat16):
            out = depthwise_conv2d_nhwc(*leaves, backend=backend)
        results.append((out, *torch.autograd.grad(out, leaves, grad.to(out.dtype))))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for name, g, w in zip(["out", "dx", "dweight", "dbias", "dresidual"], *results):
        rel = ((g.double() - w).norm() / w.norm()).item()
        assert rel < tolerance, f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_upscale_autocast_on_cuda(dtype):
    """visattn.sr.upscale under fp16 / bf16 autocast on CUDA: close to the fp32 run, tiled or not,
    uint8 in and out, and the model's own parameters stay fp32."""
    import numpy as np
    import skimage.data

    from visattn.sr import upscale

    model = timm.create_model("visattn_pan_x4.skimage", pretrained=True).cuda()
    image = skimage.data.astronaut()[:96, :120]
    fp32 = upscale(image, model, progress=False).astype(np.float64)
    for tile in (None, 64):
        half = upscale(image, model, tile=tile, tile_overlap=16, dtype=dtype, progress=False)
        assert half.dtype == np.uint8 and half.shape == (384, 480, 3)
        err = np.abs(half.astype(np.float64) - fp32)
        assert err.mean() < 0.5 and err.max() <= 12, (tile, err.mean(), err.max())
    assert next(model.parameters()).dtype == torch.float32


def test_tcsr_triton_training_step_matches_reference():
    """TCSR-B on CUDA: the Triton NA backend's forward and parameter gradients equal the reference
    backend's (fp32), so the SR model trains on the fused kernels."""
    torch.manual_seed(0)
    model = timm.create_model("visattn_tcsr_b_x2").cuda()
    x = torch.rand(2, 3, 37, 45, device="cuda")
    results = []
    for backend in ("reference", "triton"):
        for m in model.modules():
            if isinstance(m, visattn.layers.NeighborhoodAttention2d):
                m.backend = backend
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_out, ref_grads), (tri_out, tri_grads) = results
    torch.testing.assert_close(tri_out, ref_out, rtol=1e-4, atol=1e-4)
    for n, g in ref_grads.items():
        torch.testing.assert_close(tri_grads[n], g, rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("shift", [0, 4])
def test_window_attention_pads_odd_head_sizes_on_cuda(shift):
    """HAT's head size 30 is padded to 32 for SDPA's fused kernels on CUDA: same result as the
    unpadded float64 computation on CPU, for shifted, unshifted and overlapping windows."""
    from visattn.layers.window_attention import OverlappingWindowAttention, WindowAttention

    torch.manual_seed(0)
    for layer in (WindowAttention(60, 2, 8, shift), OverlappingWindowAttention(60, 2, 8)):
        x = torch.randn(2, 24, 16, 60)
        expected = layer.double()(x.double())
        got = layer.float().cuda()(x.cuda())
        torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-4, atol=1e-4)


def test_hat_golden_on_cuda_with_the_inference_kernels():
    """The HAT golden on CUDA under no_grad, where the Triton LayerNorm, the padded CAB convs and
    SDPA's fused kernels run; and the LayerNorm kernel in bf16 under autocast (fp32 out)."""
    meta, sd, io = load_golden("hat")
    model = visattn.from_official(meta, sd).cuda()
    with torch.no_grad():
        out = model(io["input"].cuda())
    torch.testing.assert_close(out.cpu(), io["output"], rtol=0, atol=meta["recommended_atol"])
    from visattn.kernels.layer_norm import layer_norm

    x = torch.randn(3000, 180, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(180, device="cuda"), torch.randn(180, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer_norm(x, w, b)
        expected = torch.nn.functional.layer_norm(x, (180,), w, b)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("branch_dtype, gamma_dtype", [(torch.bfloat16, None), (torch.bfloat16, torch.float32),
                                                       (torch.bfloat16, torch.bfloat16), (torch.float32, None)])
def test_residual_kernels_round_as_aten_on_cuda(branch_dtype, gamma_dtype):
    """The fused blocks' residual kernels, bit-exact with ATen's timm ops in bf16 on CUDA (DiNAT-T
    stage-1 rows; the CPU interpreter cannot run bf16)."""
    from test_layer_norm import check_residual_kernels

    for drop in (False, True):
        check_residual_kernels(branch_dtype, gamma_dtype, drop, "cuda", shape=(4, 56, 56, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_kernels_on_cuda(dtype):
    """The Triton LayerNorm forward and backward against autograd through F.layer_norm on CUDA
    (DiNAT-T stage-1 rows), plain and under bf16 autocast (fp32 out, as F.layer_norm)."""
    from visattn.kernels.layer_norm import layer_norm

    torch.manual_seed(0)
    x = torch.randn(8, 56, 56, 64, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(64, device="cuda", requires_grad=True)
    b = torch.randn(64, device="cuda", requires_grad=True)
    for autocast in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            got = layer_norm(x, w.to(dtype) if not autocast else w, b.to(dtype) if not autocast else b,
                             backend="triton")
            expected = torch.nn.functional.layer_norm(x, (64,), w.to(dtype) if not autocast else w,
                                                      b.to(dtype) if not autocast else b)
        assert got.dtype == expected.dtype
        dy = torch.randn_like(expected)
        g = torch.autograd.grad(got, (x, w, b), dy)
        e = torch.autograd.grad(expected, (x, w, b), dy)
        tol = 1e-4 if dtype == torch.float32 and not autocast else 3e-2
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
        for gi, ei in zip(g, e):
            torch.testing.assert_close(gi, ei, rtol=tol, atol=tol * 20)


def test_layer_norm_environment_switch(monkeypatch):
    """VISATTN_LAYER_NORM=torch makes "auto" use F.layer_norm on CUDA (the A/B switch)."""
    import visattn.kernels.layer_norm as module

    calls = []
    real = module._LayerNormFunction.apply
    monkeypatch.setattr(module._LayerNormFunction, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(64, 96, device="cuda")
    module.layer_norm(x, None, None)
    monkeypatch.setenv("VISATTN_LAYER_NORM", "torch")
    module.layer_norm(x, None, None)
    assert calls == [1]


# --- Direct kernel launches (KernelCall) ------------------------------------------------------
def test_direct_launch_keys_every_specialization():
    """A KernelCall relaunches the kernel Triton itself would pick: for each dtype and 16-byte
    alignment of the tensors, the compiled kernel it caches is the one ``JITFunction.run`` returns
    for the same arguments, and alternating aligned / misaligned rows through one call stays exact."""
    from visattn.kernels.layer_norm import _fwd_call, _layer_norm_fwd

    M, C = 96, 40
    for dtype in (torch.float32, torch.bfloat16):
        buf = torch.randn(M * C + 8, device="cuda", dtype=dtype)
        w, b = torch.randn(C, device="cuda", dtype=dtype), torch.randn(C, device="cuda", dtype=dtype)

        def tensors(rows, out, stats):  # X, Branch, Gamma, Keep, W, B, S, Y, Stats: the unused slots take rows / out
            return rows, rows, rows, rows, w, b, out, out, stats

        # A plain LayerNorm with weight and bias (no residual branch), as layer_norm_forward launches it.
        call = _fwd_call(M, C, C, C, 1, 1.0, 1e-5, (False, False, False, False, True, True, True))
        for offset in (0, 1, 0, 3, 1):  # elements: 0 is 16-byte aligned, 1 and 3 are not
            rows = buf[offset:offset + M * C].view(M, C)
            out = torch.empty(M, C, device="cuda", dtype=dtype)
            stats = torch.empty(2 * M, device="cuda")
            for _ in range(2):  # the first call of a new signature goes through JITFunction.run
                out.zero_()
                call(*tensors(rows, out, stats))
                torch.testing.assert_close(out, torch.nn.functional.layer_norm(rows, (C,), w, b), rtol=2e-2, atol=2e-2)
            signature = (torch.cuda.current_device(),) + tuple(
                (t.dtype, t.data_ptr() % 16 == 0) for t in tensors(rows, out, stats))
            jit = _layer_norm_fwd[call.grid](*tensors(rows, out, stats), *call.scalars, **call.meta)
            assert call._compiled[signature][0] is jit
        assert len(call._compiled) == 2  # aligned and misaligned rows: two specializations


def test_nat_block_compiles_with_inductor():
    """A DiNAT block (LayerNorm, dilated NA with rpb and per-axis tuples, MLP) under
    torch.compile(fullgraph=True) with inductor on CUDA: forward and gradients match eager, in fp32
    and, with the models' bf16 norm outputs, under bf16 autocast."""
    from visattn.layers import NeighborhoodAttention2d
    from visattn.layers.blocks import NHWCTransformerBlock

    torch.manual_seed(0)
    block = NHWCTransformerBlock(64, NeighborhoodAttention2d(64, 2, (7, 7), (2, 2)), autocast_norm_output=True).cuda()
    x = torch.randn(2, 28, 28, 64, device="cuda", requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    for autocast, tol in ((False, dict(rtol=1e-4, atol=1e-3)), (True, dict(rtol=2e-2, atol=5e-2))):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = compiled(x)
            ref = block(x)
        grads = torch.autograd.grad(out.float().square().sum(), (x, block.attn.rpb))
        ref_grads = torch.autograd.grad(ref.float().square().sum(), (x, block.attn.rpb))
        for g, w in zip([out, *grads], [ref, *ref_grads]):
            torch.testing.assert_close(g.float(), w.float(), **tol)


def test_biformer_block_compiles_with_inductor():
    """A BiFormer-S stage-2 block (BRA on the Triton routed kernels) under
    torch.compile(fullgraph=True) with inductor on CUDA: forward and input gradient match eager."""
    from visattn.layers import BiLevelRoutingAttention
    from visattn.models.biformer import BiFormerBlock

    torch.manual_seed(0)
    block = BiFormerBlock(128, BiLevelRoutingAttention(128, 4, n_win=7, qk_dim=128, topk=4), 3.0, 0.0).cuda()
    x = torch.randn(2, 128, 28, 28, device="cuda", requires_grad=True)
    out = torch.compile(block, fullgraph=True)(x)
    ref = block(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), x)[0],
                               torch.autograd.grad(ref.square().sum(), x)[0], rtol=1e-4, atol=1e-3)


def test_bench_model_interleaves_rounds():
    """``visattn bench model`` at a tiny batch: every model gets ``rounds`` round medians, its
    result is the median of all its timed steps (so it lies between its lowest and highest round
    median), and its peak memory is positive and below the device's."""
    from visattn.bench.model import run

    specs = ["visattn_dinat_t@triton", "visattn_dinat_t@triton:modular"]
    payload = run(specs, batch=2, image_size=224, out_dir=None, steps=2, timings=["eager", "graph"], rounds=2)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    for spec in specs:
        for timing in ("eager", "graph"):
            r = payload["results"][spec][timing]
            assert len(r["round_medians_ms"]) == 2
            low, high = min(r["round_medians_ms"]), max(r["round_medians_ms"])
            assert 0 < low and low - 1e-6 <= r["ms_per_step"] <= high + 1e-6
            assert 0 < r["peak_GiB"] < total


def test_bench_na_per_call_timing_leaves_the_inputs_and_launches_alone():
    """The per-call timing of ``visattn bench na`` captures its calls on copies of qkv: it returns
    a finite time, the original is unchanged, and the copies (same strides) reuse the cached
    launch of the original's call, adding none."""
    from visattn.bench.na import NAShape, per_call_graph_ms
    from visattn.kernels import na2d_qkv, triton_na

    shape = NAShape("small", 2, 2, 24, 24, 32, 7)
    qkv = torch.randn(2, 24, 24, 3, 2, 32, device="cuda", dtype=torch.bfloat16)
    rpb = torch.randn(2, 13, 13, device="cuda", dtype=torch.bfloat16)
    before = qkv.clone()
    with torch.no_grad():
        na2d_qkv(qkv, 7, rpb=rpb, backend="triton")
    launches = len(triton_na._CALLS.entries)
    ms = per_call_graph_ms(shape, qkv, rpb)
    assert 0 < ms < float("inf")
    assert torch.equal(qkv, before)
    assert len(triton_na._CALLS.entries) == launches


# --- CUDA graphs of the fused blocks ----------------------------------------------------------

def _graph_test_blocks(drop_path=0.0, layer_scale=None):
    """A NAT block and its copy without CUDA graphs (same parameters)."""
    import copy

    from visattn.layers import NeighborhoodAttention2d, NHWCTransformerBlock

    torch.manual_seed(0)
    block = NHWCTransformerBlock(64, NeighborhoodAttention2d(64, 2, 7, 2), layer_scale=layer_scale,
                                 drop_path=drop_path).cuda().train()
    plain = copy.deepcopy(block)
    plain.cuda_graphs = False
    return block, plain


def _graph_entry(block):
    from visattn.layers.graphed_block import _GRAPHS

    (graphs,) = _GRAPHS[block].values()
    return graphs


def _train_call(block, x, grad, autocast):
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = block(x)
    out.backward(grad)
    return out.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_block_graphs_replay_the_fused_block_on_cuda(autocast):
    """Steps 1-4 of a block (eager, forward captured, both captured, replays) give the fused
    block's outputs and gradients bit for bit, on new inputs each step."""
    block, plain = _graph_test_blocks(layer_scale=0.5)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for step in range(4):
        x = torch.randn(3, 21, 19, 64, device="cuda", generator=gen)
        grad = torch.randn(3, 21, 19, 64, device="cuda", generator=gen)
        got, want = _train_call(block, x, grad, autocast), _train_call(plain, x, grad, autocast)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        assert got[2].keys() == want[2].keys()
        for name, g in want[2].items():
            torch.testing.assert_close(got[2][name], g, rtol=0, atol=0, msg=f"step {step}: {name}")
    graphs = _graph_entry(block)
    assert graphs.forward_graph is not None and graphs.backward_graph is not None and graphs.generation == 3


def test_block_graphs_two_forwards_before_a_backward_on_cuda():
    """A second forward while the first replay's backward is pending runs without the graph, and
    both backwards get their own activations; a parameter replaced in between is seen."""
    block, plain = _graph_test_blocks()
    x = [torch.randn(2, 16, 16, 64, device="cuda") for _ in range(4)]
    for xi in x[:2]:  # warm up and capture
        _train_call(block, xi, torch.ones_like(xi), False)
        _train_call(plain, xi, torch.ones_like(xi), False)
    grads = []
    for b in (block, plain):
        b.zero_grad(set_to_none=True)
        a, c = x[2].clone().requires_grad_(), x[3].clone().requires_grad_()
        (b(a).square().sum() + b(c).sum()).backward()
        grads.append((a.grad, c.grad, b.mlp.fc1.weight.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        for b in (block, plain):
            b.mlp.fc1.weight = torch.nn.Parameter(b.mlp.fc1.weight * 0.5)
    for _ in range(3):
        got, want = _train_call(block, x[0], torch.ones_like(x[0]), False), _train_call(plain, x[0], torch.ones_like(x[0]), False)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[2]["mlp.fc1.weight"], want[2]["mlp.fc1.weight"], rtol=0, atol=0)
    assert _graph_entry(block).backward_graph is not None


def test_block_graphs_refuse_overwritten_activations_on_cuda():
    block, _ = _graph_test_blocks()
    x = torch.randn(2, 16, 16, 64, device="cuda")
    for _ in range(3):
        _train_call(block, x, torch.ones_like(x), False)
    out = block(x.clone().requires_grad_())
    out.sum().backward(retain_graph=True)
    block(x.clone().requires_grad_()).sum().backward()  # replays: the first activations are gone
    with pytest.raises(RuntimeError, match="overwrote"):
        out.sum().backward()


EXACT_CDIST = "donot_use_mm_for_euclid_dist"  # not |a|^2 + |b|^2 - 2ab, which cancels


def test_block_graphs_draw_new_drop_paths_on_cuda():
    """Drop path in a replayed graph: each sample's output is one of the four keep / drop
    combinations of the two branches, and the draws change from replay to replay."""
    block, plain = _graph_test_blocks(drop_path=0.5)
    x = torch.zeros(16, 16, 16, 64, device="cuda")  # the dilated kernel (7 x 2) fits: the fused path
    outs = [_train_call(block, x, torch.ones_like(x), False)[0] for _ in range(6)]
    assert _graph_entry(block).generation == 5  # calls 2-6 replay the forward
    with torch.no_grad():  # the candidates, from the modules (kept branches scaled by 1 / 0.5)
        x0 = x[:1]
        candidates = []
        for s1 in (x0, x0 + 2 * plain.attn(plain.norm1(x0))):
            candidates += [s1, s1 + 2 * plain.mlp(plain.norm2(s1))]
        candidates = torch.cat(candidates).flatten(1)  # [4, H * W * C]
    assert torch.cdist(candidates, candidates, compute_mode=EXACT_CDIST).add(torch.eye(4, device="cuda") * 1e9).amin() > 1.0
    patterns = set()
    for out in outs[1:]:  # the replays
        distance = torch.cdist(out.flatten(1), candidates, compute_mode=EXACT_CDIST)  # [B, 4]
        assert (distance.amin(1) < 1e-3).all()
        patterns.add(tuple(distance.argmin(1).tolist()))
    assert len(patterns) > 1
