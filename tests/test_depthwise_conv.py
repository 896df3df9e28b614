"""The fused depthwise conv + residual op: the Triton forward (CPU through TRITON_INTERPRET=1, see
conftest.py) and its backward against F.conv2d, forward and every gradient, ragged sizes,
autocast, bad input."""
import pytest
import torch
import torch.nn.functional as F

from visattn.kernels import depthwise_conv2d_nhwc

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _conv_nchw(x, weight, bias, residual):
    """nn.Conv2d's computation on the NCHW view, plus the residual (the independent path)."""
    kh, kw = weight.shape[2:]
    out = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=(kh // 2, kw // 2), groups=x.shape[-1])
    out = out.permute(0, 2, 3, 1)
    return out if residual is None else residual + out


@pytest.mark.parametrize("B, H, W, C, k, has_bias, has_residual, sliced", [
    (2, 7, 9, 24, 5, True, True, True),      # LePE: V sliced from a projection, 5x5, ragged tiles
    (1, 5, 6, 70, 3, True, True, False),     # position conv: C over one channel block
    (2, 4, 3, 16, (3, 1), False, False, False),  # 3x1 kernel, no bias, no residual
    (1, 3, 3, 8, 7, True, False, True),      # kernel larger than the map
], ids=["lepe", "pos-conv", "3x1-plain", "kernel-over-map"])
def test_triton_matches_conv2d(B, H, W, C, k, has_bias, has_residual, sliced):
    torch.manual_seed(0)
    kh, kw = (k, k) if isinstance(k, int) else k
    source = torch.randn(B, H, W, 2 * C if sliced else C, device=DEVICE)
    # sliced: a non-contiguous view (channel stride 1, token stride 2C), as V of a projection
    x = (source[..., C:] if sliced else source).requires_grad_()
    weight = torch.randn(C, 1, kh, kw, device=DEVICE, requires_grad=True)
    bias = torch.randn(C, device=DEVICE, requires_grad=True) if has_bias else None
    residual = torch.randn(B, H, W, C, device=DEVICE, requires_grad=True) if has_residual else None
    inputs = [t for t in (x, weight, bias, residual) if t is not None]
    grad = torch.randn(B, H, W, C, device=DEVICE)
    got = depthwise_conv2d_nhwc(x, weight, bias, residual, backend="triton")
    want = _conv_nchw(x, weight, bias, residual)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(["x", "weight", "bias", "residual"],
                          torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_triton_under_autocast_rounds_like_conv2d():
    """Under bf16 autocast the conv runs in bf16 (as nn.Conv2d's): its result is the exact conv of
    the bf16-rounded operands to within bf16 rounding (the interpreter's bf16 rounding is not the
    GPU's, see conftest.py); an fp32 residual keeps the sum in fp32, a bf16 one gives bf16;
    the gradients are nn.Conv2d's (the same cuDNN / ATen backward in bf16), reaching the fp32 x and
    weight in fp32."""
    torch.manual_seed(1)
    x = torch.randn(2, 6, 5, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(16, 1, 3, 3, device=DEVICE, requires_grad=True)
    bias = torch.randn(16, device=DEVICE, requires_grad=True)
    rounded = [t.detach().bfloat16().double() for t in (x, weight, bias)]
    exact_conv = _conv_nchw(*rounded, None)
    for residual in (x, x.detach().bfloat16()):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            got = depthwise_conv2d_nhwc(x, weight, bias, residual, backend="triton")
            reference = _conv_nchw(x, weight, bias, residual)
        assert got.dtype == reference.dtype == residual.dtype
        exact = residual.detach().double() + exact_conv
        torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=0.1)
        grads = torch.autograd.grad(got.float().sum(), (x, weight, bias))
        want_grads = torch.autograd.grad(reference.float().sum(), (x, weight, bias))
        for g, w in zip(grads, want_grads):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)  # the same backward as nn.Conv2d


def test_biformer_block_matches_conv_path(monkeypatch):
    """A BiFormer block (position conv, LePE) on the triton depthwise op against the torch one."""
    import visattn.kernels.depthwise_conv as dw
    from visattn.layers import BiLevelRoutingAttention
    from visattn.models.biformer import BiFormerBlock

    torch.manual_seed(2)
    block = BiFormerBlock(32, BiLevelRoutingAttention(32, 2, n_win=2, qk_dim=32, topk=2, backend="reference"), 2.0, 0.0)
    block = block.to(DEVICE)
    x = torch.randn(1, 32, 6, 6, device=DEVICE, requires_grad=True)
    want = block(x)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    on_triton = lambda x, weight, bias, residual, backend: dw.depthwise_conv2d_nhwc(x, weight, bias, residual, "triton")
    monkeypatch.setattr("visattn.layers.blocks.depthwise_conv2d_nhwc", on_triton)
    monkeypatch.setattr("visattn.layers.routed_attention.depthwise_conv2d_nhwc", on_triton)
    got = block(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], want_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call, match", [
    (lambda x, w: depthwise_conv2d_nhwc(x[0], w), r"x must be a \[B, H, W, C\] map, got \(4, 5, 8\)"),
    (lambda x, w: depthwise_conv2d_nhwc(x, w[:4]), r"weight must be \[C, 1, kh, kw\] with C = 8"),
    (lambda x, w: depthwise_conv2d_nhwc(x, torch.randn(8, 1, 2, 3)), r"odd kh, kw"),
    (lambda x, w: depthwise_conv2d_nhwc(x, w, torch.randn(4)), r"bias must have shape \(8,\)"),
    (lambda x, w: depthwise_conv2d_nhwc(x, w, residual=x[:, :2]), r"residual must have x's shape"),
    (lambda x, w: depthwise_conv2d_nhwc(x, w, backend="cudnn"), r"unknown backend 'cudnn'"),
    (lambda x, w: depthwise_conv2d_nhwc(x.double(), w.double(), backend="triton"), r"fp16 / bf16 / fp32 maps"),
    (lambda x, w: depthwise_conv2d_nhwc(x.half(), w, backend="triton"), r"must share one dtype outside autocast"),
])
def test_bad_input(call, match):
    x, w = torch.randn(1, 4, 5, 8), torch.randn(8, 1, 3, 3)
    with pytest.raises(ValueError, match=match):
        call(x, w)
