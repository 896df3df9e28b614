"""The Triton na2d backend against the reference (on CPU through TRITON_INTERPRET=1)."""
import pytest
import torch

from visattn.kernels import available_backends, na1d, na2d

# CUDA when there is one; otherwise CPU through the interpreter (tests/conftest.py turns it on).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    # H, W, kernel, dilation, stride, rpb, head_dim
    (9, 11, 3, 1, 1, True, 16),
    (14, 17, 5, 2, 3, True, 16),
    (20, 13, 3, 3, 2, False, 32),
    (12, 12, 7, 1, 7, True, 16),
    (16, 19, (3, 5), (2, 1), (1, 2), True, 24),
]


def _inputs(H, W, kernel, head_dim, with_rpb, dtype=torch.float32, requires_grad=False):
    q, k, v = (torch.randn(2, H, W, 2, head_dim, dtype=dtype, device=DEVICE, requires_grad=requires_grad) for _ in range(3))
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    rpb = torch.randn(2, 2 * kh - 1, 2 * kw - 1, dtype=dtype, device=DEVICE, requires_grad=requires_grad) if with_rpb else None
    return q, k, v, rpb


def test_registered():
    assert "triton" in available_backends()


@pytest.mark.parametrize("H, W, kernel, dilation, stride, with_rpb, head_dim", CASES)
def test_forward_matches_reference(H, W, kernel, dilation, stride, with_rpb, head_dim):
    """Ragged tiles, dilation sub-grids not dividing the size, stride, per-axis params, head_dim 24."""
    q, k, v, rpb = _inputs(H, W, kernel, head_dim, with_rpb)
    ref = na2d(q, k, v, kernel, dilation, stride, rpb=rpb, backend="reference")
    out = na2d(q, k, v, kernel, dilation, stride, rpb=rpb, backend="triton")
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


def test_strided_views_and_fp16():
    qkv = torch.randn(1, 10, 9, 3, 2, 16, device=DEVICE).half()
    q, k, v = qkv.unbind(3)
    rpb = torch.randn(2, 5, 5, device=DEVICE).half()
    out = na2d(q, k, v, 3, 2, rpb=rpb, backend="triton")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), na2d(q, k, v, 3, 2, rpb=rpb).float(), rtol=0, atol=2e-3)


def test_backward_matches_reference():
    """The fused backward gives the reference gradients of q, k, v and rpb."""
    q, k, v, rpb = _inputs(9, 10, 3, 16, True, requires_grad=True)
    grad = torch.randn(2, 9, 10, 2, 16, device=DEVICE)
    got = torch.autograd.grad(na2d(q, k, v, 3, 2, 2, rpb=rpb, backend="triton"), (q, k, v, rpb), grad)
    want = torch.autograd.grad(na2d(q, k, v, 3, 2, 2, rpb=rpb, backend="reference"), (q, k, v, rpb), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 3e-2)] + ([(torch.bfloat16, 1e-1)] if DEVICE == "cuda" else []))
def test_backward_half_precision(dtype, tol):
    """Half-precision gradients (the interpreter is wrong for bf16 arithmetic, so bf16 runs on CUDA only)."""
    q, k, v, rpb = _inputs(9, 10, 3, 16, True, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, 9, 10, 2, 16, device=DEVICE, dtype=dtype)
    got = torch.autograd.grad(na2d(q, k, v, 3, 2, rpb=rpb, backend="triton"), (q, k, v, rpb), grad)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v, rpb)]
    want = torch.autograd.grad(na2d(*ref_in[:3], 3, 2, rpb=ref_in[3], backend="reference"), ref_in, grad.float())
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, rtol=tol, atol=tol)


def test_unsupported_calls_raise():
    q, k, v = (torch.randn(1, 9, 2, 16, device=DEVICE) for _ in range(3))
    with pytest.raises(ValueError, match="implements na2d only"):
        na1d(q, k, v, 3, backend="triton")
    q, k = (torch.randn(1, 9, 9, 2, 16, device=DEVICE) for _ in range(2))
    with pytest.raises(ValueError, match="needs v's head_dim == q's"):
        na2d(q, k, torch.randn(1, 9, 9, 2, 8, device=DEVICE), 3, backend="triton")


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (torch.randn(1, 9, 9, 2, 16) for _ in range(3))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        na2d(q, k, v, 3, backend="triton")
